"""Stage one's overheads: extract against a bare forward loop, and the cache's write bandwidth
against the disk's raw sequential write, measured in one run.

    python benchmarks/extraction.py                                  # CPU: vit_tiny, 256 images, batch 32
    python benchmarks/extraction.py --model vit_b16 --device cuda --images 2048 --batch-size 64
    python benchmarks/extraction.py --spec my_spec.yaml        # another cache spec

- extract: `sidetune.extract` over a generated image folder (images decoded by the same worker
  processes, the backbone, the cast, shard assembly and the background shard writer); the
  split's own seconds, so backbone loading is excluded.
- forward: the same DataLoader, transform, batch size and backbone forward over every stage,
  results dropped. Each is run twice, alternating; the faster of each counts.
- write: the cache's bytes written again through the cache writer (zarr shards, as extract
  writes them) vs the same bytes written raw to one file; both end with os.sync().

Like the command line, it first has glibc keep freed memory (`keep_freed_memory`);
SIDETUNE_MALLOC=default measures with the C library's own settings (recorded as `malloc`)."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import WORK, generated_images, machine, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--spec", default="default", help="Cache spec name or YAML path.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import sidetune
    from sidetune.backbones import forward_stages, load_backbone, resolve_preprocessing
    from sidetune.compute import autocast, resolve_compute
    from sidetune.datasets import load_source
    from sidetune.features import ImageDataset, collate_images, default_workers
    from sidetune.malloc import keep_freed_memory

    malloc = "kept" if keep_freed_memory() else "default"
    folder = generated_images(WORK / f"images-{args.images}", args.images)
    cache_path = WORK / f"extract-{args.model}-{args.images}"
    device, dtype = resolve_compute(args.device, "auto")
    backbone = load_backbone(args.model, pretrained=args.pretrained)
    backbone.model.to(device)
    split = load_source(str(folder)).splits["train"]
    stages = list(range(backbone.depth + 1))

    def bare_forward() -> float:
        loader = torch.utils.data.DataLoader(
            ImageDataset(split, resolve_preprocessing("vtab", backbone).transform()), batch_size=args.batch_size,
            num_workers=default_workers(device), collate_fn=collate_images, pin_memory=device.type == "cuda")
        started = time.perf_counter()
        with torch.inference_mode(), autocast(device, dtype):
            for images, _, _ in loader:
                outputs = list(forward_stages(backbone.model, images.to(device, non_blocking=True), stages))
                torch.stack([x.float() for x in outputs], 1).half().cpu()  # the same device-to-host copy
        return time.perf_counter() - started

    def extract() -> float:
        reports = sidetune.extract(args.model, str(folder), cache_path, pretrained=args.pretrained, device=args.device,
                                   batch_size=args.batch_size, spec=args.spec, overwrite=True)
        return reports[0].seconds

    forward_seconds, extract_seconds = [], []
    for _ in range(2):
        forward_seconds.append(bare_forward())
        extract_seconds.append(extract())
    forward_rate, extract_rate = args.images / min(forward_seconds), args.images / min(extract_seconds)

    cache = sidetune.open_cache(cache_path)
    tokens = cache.split("train").load()
    write_cache, write_raw = _write_bandwidths(cache, tokens)
    rows = [
        {"measure": "forward images/s", "value": round(forward_rate, 1)},
        {"measure": "extract images/s", "value": round(extract_rate, 1),
         "ratio": round(extract_rate / forward_rate, 3)},
        {"measure": "raw sequential write MB/s", "value": round(write_raw, 1)},
        {"measure": "cache write MB/s", "value": round(write_cache, 1), "ratio": round(write_cache / write_raw, 3)},
    ]
    for row in rows:
        print(row)
    write_result("extraction", {"model": args.model, "images": args.images, "batch_size": args.batch_size, "malloc": malloc,
                                "cache_bytes": int(tokens.nbytes), "machine": machine(device), "rows": rows}, args.out)


def _write_bandwidths(cache, tokens: np.ndarray) -> tuple[float, float]:
    """MB/s writing `tokens` as a cache split (zarr shards via the cache writer) and raw."""
    from sidetune.cache.store import CacheWriter

    target = WORK / "write-test"
    shutil.rmtree(target, ignore_errors=True)
    spec = cache.manifest["spec"]
    writer = CacheWriter.open(target / "cache", {**cache.manifest, "splits": {}})
    split = writer.split("train", cache.split("train").labels, tokens.shape[1:], spec["dtype"], spec["chunk_images"],
                         spec["shard_images"], spec["compressor"])
    os.sync()
    started = time.perf_counter()
    for shard in range(split.num_shards):
        start, stop = split.shard_bounds(shard)
        split.write_shard(shard, tokens[start:stop], np.zeros(tokens.shape[1], dtype=np.float32))
    os.sync()
    cache_seconds = time.perf_counter() - started

    started = time.perf_counter()
    with open(target / "raw.bin", "wb") as handle:
        handle.write(tokens.tobytes())
    os.sync()
    raw_seconds = time.perf_counter() - started
    shutil.rmtree(target)
    megabytes = tokens.nbytes / 1e6
    return megabytes / cache_seconds, megabytes / raw_seconds


if __name__ == "__main__":
    main()
