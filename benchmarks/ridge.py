"""The closed-form ridge sweep against trained linear probes: 64 L2 strengths from one
eigendecomposition, against 64 trainings of `linear` (one per weight decay), on the same cache.

    python benchmarks/ridge.py [--epochs 30] [--out FILE]

digits through the random test_vit: train800 -> val200. Reports the seconds of each way (the
split's features loaded once beforehand and shared) and the best val200 top-1 each reaches."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import sidetune
from common import WORK, machine, write_result
from sidetune.sweeps import expand_grid
from sidetune.training import train_group
from sidetune.training.data import LoadedSplits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    path = WORK / "digits-test_vit"
    if not (path / "zarr.json").exists():
        sidetune.extract("test_vit", "digits", path, pretrained=False, device="cpu")
    cache = sidetune.open_cache(path)
    loaded = LoadedSplits(cache, torch.device("cpu"))
    loaded.get("train800", [cache.manifest["layout"]["stages"][-1]])
    penalties = [float(p) for p in np.logspace(-3, 6, 64)]
    rows = []

    started = time.perf_counter()
    ridge = train_group(cache, expand_grid("ridge", {"weight_decay": penalties}), "train800", "val200", "cpu", loaded=loaded)
    rows.append({"way": "ridge, 64 penalties in one solve", "seconds": round(time.perf_counter() - started, 3),
                 "best_top1": max(r.top1 for r in ridge),
                 "best_setting": f"lambda {penalties[int(np.argmax([r.top1 for r in ridge]))]:.3g}"})
    print(rows[-1], flush=True)

    decays = [float(d) for d in np.logspace(-6, -1, 64)]
    started = time.perf_counter()
    linear = [train_group(cache, [config], "train800", "val200", "cpu", loaded=loaded)[0]
              for config in expand_grid("linear", {"weight_decay": decays}, {"epochs": args.epochs})]
    rows.append({"way": f"linear, 64 trainings of {args.epochs} epochs", "seconds": round(time.perf_counter() - started, 3),
                 "best_top1": max(r.top1 for r in linear),
                 "best_setting": f"weight decay {decays[int(np.argmax([r.top1 for r in linear]))]:.3g}"})
    print(rows[-1], flush=True)
    write_result("ridge", {"model": "test_vit", "dataset": "digits", "machine": machine(torch.device("cpu")),
                           "rows": rows}, args.out)


if __name__ == "__main__":
    main()
