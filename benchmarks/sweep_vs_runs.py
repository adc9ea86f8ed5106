"""A sweep against separate runs, as a user runs them: one `sidetune sweep` of K LAST
configurations (at several `--max-stack` sizes) against K `sidetune train` processes one after
another, each a whole command (start-up, loading, training, evaluation), on the digits cache of
the random test_vit.

    python benchmarks/sweep_vs_runs.py [--configs 16] [--epochs 3] [--out FILE]

Every case runs twice: as the command line runs by default (glibc's malloc keeping freed memory,
`sidetune.malloc.keep_freed_memory`) and with SIDETUNE_MALLOC=default (the C library's own
settings). Per case: wall seconds, the CPU's user and system seconds and the minor page faults
of the child processes (getrusage), and the ratio to the K separate runs of the same allocator."""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import sidetune
from common import WORK, machine, write_result

ROOT = Path(__file__).resolve().parents[1]
LRS = ("3e-4", "1e-3", "3e-3", "1e-2")


def command(*args: str, malloc: str) -> dict:
    """Run `python -m sidetune ARGS` to completion; its wall, user and system seconds and faults."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "SIDETUNE_MALLOC": malloc}
    done = subprocess.run([sys.executable, "-m", "sidetune", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"sidetune {' '.join(args)} failed:\n{done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": wall, "user": after.ru_utime - before.ru_utime, "system": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt}


def add(totals: dict, more: dict) -> dict:
    return {key: totals.get(key, 0) + value for key, value in more.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--stacks", default="1,4,16", help="--max-stack values for the sweep.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cache = WORK / "digits-test_vit"
    if not (cache / "zarr.json").exists():
        sidetune.extract("test_vit", "digits", cache, pretrained=False)
    if args.configs % len(LRS):
        raise SystemExit(f"--configs must be a multiple of {len(LRS)} (the learning rates swept)")
    configs = list(itertools.product(range(args.configs // len(LRS)), LRS))  # (seed, lr)
    common = ["--cache", str(cache), "--method", "last", "--rank", "8", "--epochs", str(args.epochs),
              "--train-split", "train800", "--eval-split", "val200", "--device", "cpu"]
    runs_dir = WORK / "sweep-vs-runs"
    rows = []
    for malloc in ("kept", "default"):
        separate: dict = {}
        for seed, lr in configs:
            separate = add(separate, command("train", *common, "--lr", lr, "--seed", str(seed), "--overwrite",
                                             "--out", str(runs_dir / f"run-{seed}-{lr}"), malloc=malloc))
        cases = [{"case": f"{args.configs} separate `sidetune train` runs", "max_stack": None, **separate}]
        print(cases[-1], flush=True)
        for stack in map(int, args.stacks.split(",")):
            seeds_text = ",".join(sorted({str(seed) for seed, _ in configs}))
            out = runs_dir / f"sweep-{stack}"
            shutil.rmtree(out, ignore_errors=True)
            cases.append({"case": f"one `sidetune sweep`, --max-stack {stack}", "max_stack": stack,
                          **command("sweep", *common, "--protocol", "none", "--lr", ",".join(LRS), "--seed",
                                    seeds_text, "--max-stack", str(stack), "--out", str(out), malloc=malloc)})
            print(cases[-1], flush=True)
        for row in cases:
            row["malloc"] = malloc
            row["vs_separate"] = round(row["seconds"] / separate["seconds"], 3)
            row.update({key: round(row[key], 2) for key in ("seconds", "user", "system")})
        rows += cases
    write_result("sweep_vs_runs", {"model": "test_vit", "method": "last (rank 8)", "configs": args.configs,
                                   "epochs": args.epochs, "machine": machine(torch.device("cpu")), "rows": rows},
                 args.out)


if __name__ == "__main__":
    main()
