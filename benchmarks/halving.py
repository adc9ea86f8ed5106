"""Successive halving against the full sweep: wall time, and whether the same configuration wins.

    python benchmarks/halving.py [--epochs 9] [--out FILE]

Two tasks through the random test_vit: digits, and a generated VTAB-style folder (1200 noise
images with a weak class tint: 800 train, 200 val, 200 test). On each, the default grid of
linear and of LAST is swept twice with the VTAB protocol (select on train800 -> val200,
retrain the best on train800val200, report test): in full, and with `--halving` (factor 3,
first rung after 1 epoch). Both in this process, features loaded once."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sidetune
from common import WORK, machine, random_vit_caches, write_result
from sidetune.sweeps import default_grid, expand_grid
from sidetune.sweeps.halving import Halving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for task, cache in random_vit_caches("halving").items():
        for method in ("linear", "last"):
            configs = expand_grid(method, default_grid(method), {"epochs": args.epochs})
            outcome = {}
            for name, halving in (("full", None), ("halving", Halving(3, 1))):
                started = time.perf_counter()
                report = sidetune.sweep(cache, configs, out=WORK / f"halving-runs/{task}-{method}-{name}",
                                        halving=halving, device="cpu")
                outcome[name] = {"seconds": round(time.perf_counter() - started, 2), "winner": report.best.config_id,
                                 "test_top1": report.best.top1,
                                 "epochs_trained": sum(row.epochs_trained or 0 for row in report.rows if row.phase == "select")}
            rows.append({"task": task, "method": method, "configs": len(configs), "epochs": args.epochs, **{
                f"{name}_{key}": value for name, values in outcome.items() for key, value in values.items()},
                "time_ratio": round(outcome["halving"]["seconds"] / outcome["full"]["seconds"], 2),
                "same_winner": outcome["halving"]["winner"] == outcome["full"]["winner"]})
            print(rows[-1], flush=True)
    write_result("halving", {"model": "test_vit", "machine": machine(torch.device("cpu")), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
