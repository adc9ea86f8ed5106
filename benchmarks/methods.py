"""Every method side by side on one cache: top-1 and seconds of linear, ridge, attentive,
head2toe, LAST, LoSA, restuning, MIST, LST and LAST with c²FroFA augmentation, on digits and on
a generated VTAB-style task.

    python benchmarks/methods.py [--epochs 20] [--out FILE]

Each task's cache comes from the random test_vit (every stage and token). Each method trains
once on train800 and is scored on val200, at its default settings and a learning rate that
trains in few epochs on these random features (ridge: the best of its default λ grid, all solved
at once); seconds include building the network and the final evaluation, not loading the split
(shared). Random weights: the ranking says how the methods train, not how well they transfer."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import machine, random_vit_caches, write_result
from sidetune.sweeps import default_grid, expand_grid
from sidetune.training import train_group
from sidetune.training.data import LoadedSplits

METHODS = [("linear", {}, {}), ("ridge", {}, None), ("attentive", {"lr": 1e-2}, {}), ("head2toe", {}, {}),
           ("last", {"lr": 3e-3}, {"rank": 8}), ("losa", {"lr": 3e-3}, {"token_rank": 8, "channel_rank": 8}),
           ("restuning", {"lr": 3e-3}, {"bottleneck": 8}), ("mist", {"lr": 3e-3}, {"rank": 8}),
           ("lst", {"lr": 1e-2}, {"reduction": 4}),
           ("last", {"lr": 3e-3, "augment": "frofa-brightness", "augment_magnitude": 0.5}, {"rank": 8})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for task, cache in random_vit_caches("methods").items():
        loaded = LoadedSplits(cache, torch.device("cpu"))
        for method, fields, options in METHODS:
            if options is None:  # ridge: its whole default grid, one solve
                configs = expand_grid(method, default_grid(method))
            else:
                configs = expand_grid(method, {}, {"epochs": args.epochs, "warmup_epochs": 2, **fields, **options})
            started = time.perf_counter()
            results = train_group(cache, configs, "train800", "val200", "cpu", loaded=loaded)
            best = max(results, key=lambda r: r.top1 if r.top1 is not None else -1.0)
            label = method + (" + c2FroFA" if fields.get("augment", "none") != "none" else "")
            rows.append({"task": task, "method": label, "top1": round(best.top1, 2), "seconds": round(time.perf_counter() - started, 2),
                         "params": best.params, "epochs": 0 if options is None else args.epochs,
                         "configurations": len(configs)})
            print(rows[-1], flush=True)
    write_result("methods", {"model": "test_vit", "machine": machine(torch.device("cpu")), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
