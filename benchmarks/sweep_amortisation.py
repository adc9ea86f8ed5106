"""Sweep amortisation: wall time of K stacked configurations vs one, in one process.

    python benchmarks/sweep_amortisation.py [--cache DIR] [--out FILE]          # CPU, digits, test_vit
    python benchmarks/sweep_amortisation.py --model vit_b16 --images 1000 --device cuda --stacks 1,4,16,64

Without --cache, builds the digits cache with the random test_vit (as `sidetune demo` does), or
with `--model`, a cache of that backbone (random weights) over generated 224x224 images, whose
train split (80%) trains and test split evaluates.
Reports, per method and K, the seconds for 2 epochs on train800 (trained, evaluated on
val200; the split's features are loaded once beforehand and shared by every run) and the ratio to K = 1, and the seconds of K separate single-config runs
(measured, one after another in the same process) with the speed-up of the sweep over them.
The `torch.compile` rows run each K twice: the first run (compiling) is reported as
`first_run_seconds`, the second as `seconds`. The process keeps freed memory as the command
line does."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sidetune
from common import WORK, generated_images, machine, write_result
from sidetune.malloc import keep_freed_memory
from sidetune.sweeps import expand_grid
from sidetune.training import train_group
from sidetune.training.data import LoadedSplits

CASES = [("linear", {}, False, "1,4,16,64"), ("last", {"rank": 8}, False, "1,4,16,64"),
         ("losa", {"token_rank": 8, "channel_rank": 8}, False, "1,4,16"), ("last", {"rank": 8}, True, "1,16")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=WORK / "digits-test_vit")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stacks", default=None, help="K values for every method (default: per method, up to 64).")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="A backbone for a generated-image cache (default: digits, test_vit).")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--skip-compile", action="store_true", help="Leave out the torch.compile rows.")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does
    device = torch.device(args.device)
    splits = ("train800", "val200")
    if args.model:
        args.cache = WORK / f"cache-{args.model}-{args.images}"
        splits = ("train", "test")
        if not (args.cache / "zarr.json").exists():
            folder = generated_images(WORK / f"images-{args.images}", args.images)
            sidetune.extract(args.model, str(folder), args.cache, pretrained=False, device=args.device)
    elif not (args.cache / "zarr.json").exists():
        sidetune.extract("test_vit", "digits", args.cache, pretrained=False)
    cache = sidetune.open_cache(args.cache)

    loaded = LoadedSplits(cache, device)  # every run shares one load: the figures compare training alone

    def run(configs, compile=False):
        return timed(lambda: train_group(cache, configs, *splits, device, compile=compile, loaded=loaded), device)

    rows = []
    for method, options, compile, stacks in CASES:
        if compile and args.skip_compile:
            continue
        baseline: list[float] = []  # the K = 1 seconds of this case

        def measure(row: dict, configs: list, compile: bool) -> None:
            if compile:
                row["first_run_seconds"] = round(run(configs, compile=True), 3)
            seconds = run(configs, compile)
            baseline.append(seconds)
            row.update(seconds=round(seconds, 3), ratio_to_one=round(seconds / baseline[0], 2))
            if not compile:
                separate = seconds if len(configs) == 1 else sum(run([config]) for config in configs)
                row.update(separate_seconds=round(separate, 3), speedup_over_separate=round(separate / seconds, 2))

        run(expand_grid(method, {}, {"epochs": 1, "warmup_epochs": 0, **options}))  # untimed: loads the stages, warms up
        for k in map(int, (args.stacks or stacks).split(",")):
            configs = expand_grid(method, {"seed": list(range(k))}, {"epochs": args.epochs, "warmup_epochs": 0, **options})
            row = {"method": method, "compile": compile, "configs": k}
            try:
                measure(row, configs, compile)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                row["out_of_memory"] = True
            rows.append(row)
            print(rows[-1], flush=True)
            if row.get("out_of_memory"):
                break
    write_result("sweep_amortisation", {"epochs": args.epochs, "cache": str(args.cache), "model": args.model or "test_vit",
                                        "machine": machine(device), "rows": rows}, args.out)


def timed(work, device: torch.device) -> float:
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
