"""Real pretrained weights on real images: EfficientNet-Lite0's ImageNet weights against random
weights of the same architecture, on Fashion-MNIST in a VTAB-1k-style split: every method (and
linear and LAST with c²FroFA feature augmentation), each by the VTAB-1k protocol of `sidetune
sweep`: its default grid (restuning: two learning rates; with c²FroFA also magnitudes 0.25 and
0.5, LAST at rank 16) selected on val200, refit on train800val200, top-1 on a fixed 1,000-image
test sample.

    python benchmarks/real_weights.py [--epochs 20] [--test-images 1000] [--methods ROWS] [--out FILE]

`--methods "mist,lst"` reruns only those rows, keeping the others from the result file and
reusing the caches an earlier run left (a complete cache is not extracted again).

Needs what tests/test_real_weights.py needs (`pip install -e '.[test]'`,
`apt-get install dataset-fashion-mnist`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import sidetune
from common import RESULTS, WORK, machine, write_result
from sidetune.sweeps import default_grid, expand_grid

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from real_data import TIMM_NAME, convert_lite0_weights, fashion_mnist_folder  # noqa: E402

SPEC = "stages: all\ntokens: all\nmax_grid: 3\ndtype: float16\n"
# (row, method, fixed settings, grid replacing or extending the method's default grid)
AUGMENTED = {"augment": "frofa-brightness"}
MAGNITUDES = {"augment_magnitude": [0.25, 0.5]}
METHODS = [("linear", "linear", {"pool": "mean"}, {}), ("ridge", "ridge", {"pool": "mean"}, {}),
           ("head2toe", "head2toe", {"pool": "mean"}, {}), ("attentive", "attentive", {}, {}),
           ("last", "last", {"pool": "mean"}, {}), ("losa", "losa", {"pool": "mean"}, {}),
           ("restuning", "restuning", {"pool": "mean", "bottleneck": 32, "weight_decay": 1e-4},
            {"lr": [1e-3, 3e-3], "weight_decay": [1e-4], "bottleneck": [32]}),
           ("mist", "mist", {"pool": "mean"}, {}), ("lst", "lst", {"pool": "mean"}, {}),
           ("linear + c2FroFA", "linear", {"pool": "mean", **AUGMENTED}, MAGNITUDES),
           ("last + c2FroFA", "last", {"pool": "mean", "rank": 16, **AUGMENTED}, {"rank": [16], **MAGNITUDES})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--methods", default=None, help="Comma-separated row labels to rerun (default: all).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chosen = set(args.methods.split(",")) if args.methods else {label for label, *_ in METHODS}
    out = args.out or RESULTS / "real_weights.json"
    kept = [row for row in json.loads(out.read_text())["rows"] if row["method"] not in chosen] if args.methods else []
    root = WORK / "real-weights"
    root.mkdir(parents=True, exist_ok=True)
    weights = convert_lite0_weights(root / "lite0.safetensors")
    folder = fashion_mnist_folder(root / f"fashion-{args.test_images}", test_images=args.test_images)
    (root / "spec.yaml").write_text(SPEC)
    rows = []
    for name, source in (("pretrained", {"weights": weights}), ("random", {"pretrained": False})):
        cache = root / f"cache-{name}-{args.test_images}"
        started = time.perf_counter()
        sidetune.extract(TIMM_NAME, str(folder), cache, spec=str(root / "spec.yaml"), preprocess="inception",
                         splits=["train800", "val200", "train800val200", "test"], device="cpu",
                         overwrite=not args.methods, **source)
        extract_seconds = time.perf_counter() - started
        earlier = [row["extract_seconds"] for row in kept if row["weights"] == name]
        extract_seconds = earlier[0] if earlier else extract_seconds  # a reused cache's: when it was built
        for label, method, options, extra in METHODS:
            if label not in chosen:
                rows.extend(row for row in kept if row["weights"] == name and row["method"] == label)
                continue
            grid = {**default_grid(method), **extra}
            fixed = {key: value for key, value in options.items() if key not in grid}
            fixed = fixed if method == "ridge" else {**fixed, "epochs": args.epochs}
            configs = expand_grid(method, grid, fixed)
            started = time.perf_counter()
            sweep_out = root / f"sweep-{name}-{label.replace(' + ', '-')}"
            report = sidetune.sweep(cache, configs, out=sweep_out, protocol="vtab", device="cpu")
            rows.append({"weights": name, "method": label, "top1": round(report.best.top1, 2),
                         "configurations": len(configs), "seconds": round(time.perf_counter() - started, 1),
                         "extract_seconds": round(extract_seconds, 1)})
            print(rows[-1], flush=True)
    write_result("real_weights", {"model": TIMM_NAME, "dataset": "fashion-mnist (Debian)", "epochs": args.epochs,
                                  "test_images": args.test_images, "machine": machine(torch.device("cpu")),
                                  "rows": rows}, out)


if __name__ == "__main__":
    main()
