"""8-bit tokens against float16: bytes, load-and-decode speed, feature error per stage, and the
top-1 of linear and LAST trained from each, on the same splits, in one run.

    python benchmarks/codecs.py [--model test_vit] [--out FILE]

Caches of digits (train800val200 stored; train800 and val200 its rows) through one backbone
(random weights) in float32 (the reference), float16, int8 with per-token scales and int8 with
per-channel scales. Per format: bytes per image; seconds to load the training split onto the
CPU and to run one epoch of batch gathering (decoding int8 batch by batch), each the best of
three; the relative error ||x - x_fp32|| / ||x_fp32|| per stage, over all tokens and at the CLS
token; and the val200 top-1 of a linear probe and of LAST (rank 8) trained on train800 with the
same seeds."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import sidetune
from common import WORK, machine, write_result
from sidetune.cache.spec import CacheSpec
from sidetune.training import train_group
from sidetune.training.data import load_features

FORMATS = {"float32": {"dtype": "float32"}, "float16": {"dtype": "float16"},
           "int8 (per token)": {"dtype": "int8", "scale": "token"}, "int8 (per channel)": {"dtype": "int8", "scale": "channel"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_vit")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    caches = {}
    for name, fields in FORMATS.items():
        path = WORK / f"codecs-{args.model}-{fields['dtype']}-{fields.get('scale', '')}"
        spec = CacheSpec(name=name.replace(" ", ""), **fields)
        sidetune.extract(args.model, "digits", path, spec=spec, pretrained=False, device="cpu")
        caches[name] = sidetune.open_cache(path)
    exact = caches["float32"].split("train800val200").load().astype(np.float32)
    stages = caches["float32"].manifest["layout"]["stages"]
    rows = []
    for name, cache in caches.items():
        split = cache.split("train800val200")
        tokens = split.load().astype(np.float32)
        error = [float(np.linalg.norm(tokens[:, s] - exact[:, s]) / np.linalg.norm(exact[:, s])) for s in range(len(stages))]
        cls_error = [float(np.linalg.norm(tokens[:, s, 0] - exact[:, s, 0]) / np.linalg.norm(exact[:, s, 0]))
                     for s in range(len(stages))]
        load_seconds, epoch_seconds = best_of(3, lambda: load_and_gather(cache))
        top1 = {}
        for method, options, epochs, lr in (("linear", {}, 30, 0.3), ("last", {"rank": 8}, 10, 3e-3)):
            config = sidetune.TrainConfig.create(method, options, epochs=epochs, lr=lr, warmup_epochs=1)
            [result] = train_group(cache, [config], "train800", "val200", "cpu")
            top1[method] = result.top1
        rows.append({"format": name, "bytes_per_image": split.nbytes_stored / split.num_images,
                     "load_seconds": load_seconds, "gather_epoch_seconds": epoch_seconds,
                     "error_per_stage": error, "cls_error_per_stage": cls_error,
                     "linear_top1": top1["linear"], "last_top1": top1["last"]})
        print({k: v for k, v in rows[-1].items() if "per_stage" not in k}, flush=True)
    write_result("codecs", {"model": args.model, "dataset": "digits", "stages": stages,
                            "machine": machine(torch.device("cpu")), "rows": rows}, args.out)


def load_and_gather(cache) -> tuple[float, float]:
    started = time.perf_counter()
    features = load_features(cache, "train800val200", cache.manifest["layout"]["stages"], torch.device("cpu"))
    loaded = time.perf_counter()
    for _ in features.batches(64, torch.Generator().manual_seed(0)):
        pass
    return loaded - started, time.perf_counter() - loaded


def best_of(repeats: int, work) -> tuple[float, float]:
    timings = [work() for _ in range(repeats)]
    return round(min(t[0] for t in timings), 4), round(min(t[1] for t in timings), 4)


if __name__ == "__main__":
    main()
