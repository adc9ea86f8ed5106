"""Sweep amortisation on CPU: wall time of K stacked configurations vs one, in one process.

    python benchmarks/sweep_amortisation.py [--cache DIR] [--out FILE]

Without --cache, builds the digits cache with the random test_vit (as `sidetune demo` does).
Reports, per method and K, the seconds for 2 epochs on train800 (features loaded, trained,
evaluated on val200) and the ratio to K = 1, and the seconds of K separate single-config runs
(measured, one after another in the same process) with the speed-up of the sweep over them.
The `torch.compile` rows run each K twice: the first run (compiling) is reported as
`first_run_seconds`, the second as `seconds`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sidetune
from common import WORK, machine, write_result
from sidetune.engine import train_group
from sidetune.sweep import expand_grid

CASES = [("linear", {}, False, "1,4,16,64"), ("last", {"rank": 8}, False, "1,4,16,64"),
         ("losa", {"token_rank": 8, "channel_rank": 8}, False, "1,4,16"), ("last", {"rank": 8}, True, "1,16")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=WORK / "digits-test_vit")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stacks", default=None, help="K values for every method (default: per method, up to 64).")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if not (args.cache / "zarr.json").exists():
        sidetune.extract("test_vit", "digits", args.cache, pretrained=False)
    cache = sidetune.open_cache(args.cache)
    rows = []
    for method, options, compile, stacks in CASES:
        baseline = None
        for k in map(int, (args.stacks or stacks).split(",")):
            configs = expand_grid(method, {"seed": list(range(k))}, {"epochs": args.epochs, "warmup_epochs": 0, **options})
            row = {"method": method, "compile": compile, "configs": k}
            if compile:
                row["first_run_seconds"] = round(timed(lambda: train_group(cache, configs, "train800", "val200", compile=True)), 3)
            seconds = timed(lambda: train_group(cache, configs, "train800", "val200", compile=compile))
            baseline = baseline or seconds
            row.update(seconds=round(seconds, 3), ratio_to_one=round(seconds / baseline, 2))
            if not compile:
                separate = seconds if k == 1 else sum(
                    timed(lambda: train_group(cache, [config], "train800", "val200")) for config in configs)
                row.update(separate_seconds=round(separate, 3), speedup_over_separate=round(separate / seconds, 2))
            rows.append(row)
            print(rows[-1], flush=True)
    write_result("sweep_amortisation", {"epochs": args.epochs, "cache": str(args.cache),
                                        "machine": machine(torch.device("cpu")), "rows": rows}, args.out)


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
