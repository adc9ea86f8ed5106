"""Stage two's loading: seconds to bring a cached split into memory against reading the same
bytes raw, in one run.

    python benchmarks/loading.py                      # the extraction benchmark's vit_tiny cache
    python benchmarks/loading.py --cache ./cache/dtd --split train800val200 --device cuda

- load: `load_features` (the resident path stage two takes: zarr shards read and assembled into
  one array, then moved to the device).
- raw: every file of the split's `tokens` array read with plain `open().read()`.
Each is run three times, alternating; the fastest counts. When the kernel's page cache can be
dropped (root on Linux) both are also measured cold."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import WORK, machine, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=WORK / "extract-vit_tiny_patch16_224-256")
    parser.add_argument("--split", default="train")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import sidetune
    from sidetune.training.data import load_features

    if not args.cache.exists():
        raise SystemExit(f"No cache at {args.cache}: run benchmarks/extraction.py first, or pass --cache.")
    cache = sidetune.open_cache(args.cache)
    device = torch.device(args.device)
    files = sorted(p for p in (args.cache / args.split / "tokens").rglob("*") if p.is_file())
    nbytes = sum(p.stat().st_size for p in files)

    def load() -> float:
        started = time.perf_counter()
        features = load_features(cache, args.split, None, device, budget_bytes=2**62)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del features
        return time.perf_counter() - started

    def raw() -> float:
        started = time.perf_counter()
        for path in files:
            with open(path, "rb") as handle:
                handle.read()
        return time.perf_counter() - started

    rows = []
    for temperature, prepare in (("warm", lambda: None), ("cold", _drop_page_cache)):
        if temperature == "cold" and not _drop_page_cache():
            print("page cache cannot be dropped here (needs root on Linux): cold figures skipped")
            continue
        seconds = {"load": [], "raw": []}
        for _ in range(3):
            for name, measure in (("load", load), ("raw", raw)):
                prepare()
                seconds[name].append(measure())
        load_s, raw_s = min(seconds["load"]), min(seconds["raw"])
        rows.append({"page_cache": temperature, "load_seconds": round(load_s, 3), "raw_seconds": round(raw_s, 3),
                     "load_MBps": round(nbytes / 1e6 / load_s, 1), "raw_MBps": round(nbytes / 1e6 / raw_s, 1),
                     "ratio": round(raw_s / load_s, 3)})
        print(rows[-1])
    write_result("loading", {"cache": str(args.cache), "split": args.split, "bytes": nbytes,
                             "machine": machine(device), "rows": rows}, args.out)


def _drop_page_cache() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
