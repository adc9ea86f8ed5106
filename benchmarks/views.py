"""Augmented views in the cache against no augmentation and c²FroFA, for linear and LAST, on the
real-weights task (EfficientNet-Lite0's ImageNet weights on Fashion-MNIST, as
benchmarks/real_weights.py caches it) and on digits through the random test_vit.

    python benchmarks/views.py [--epochs 50] [--out FILE]

One cache per task with 8 views of every training image (VPT's transform); 2 and 4 views are
its first 2 and 4 (views are seeded per image and index, so they are exactly the views a 2- or
4-view cache holds). Every variant trains at the method's default settings on train800val200
and is scored on test: none (`--views 0`), c²FroFA brightness at magnitude 0.5, and 2, 4 and 8
views. Bytes: the training images' tokens as a cache with that many views stores them."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import sidetune
from common import WORK, machine, write_result
from sidetune.cache.plan import human_bytes
from sidetune.training import TrainConfig, train_group

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from real_data import TIMM_NAME, convert_lite0_weights, fashion_mnist_folder  # noqa: E402

SPEC = "stages: all\ntokens: all\nmax_grid: 3\ndtype: float16\n"  # as benchmarks/real_weights.py
VIEWS = 8
VARIANTS = {"none": {"views": 0}, "c2FroFA": {"views": 0, "augment": "frofa-brightness", "augment_magnitude": 0.5},
            "2 views": {"views": 2}, "4 views": {"views": 4}, "8 views": {"views": 8}}
OPTIONS = {"linear": {"pool": "mean"}, "last": {"pool": "mean"}}


def caches() -> dict[str, sidetune.Cache]:
    root = WORK / "views"
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(SPEC)
    weights = convert_lite0_weights(root / "lite0.safetensors")
    fashion = fashion_mnist_folder(root / "fashion", test_images=1000)
    sidetune.extract(TIMM_NAME, str(fashion), root / "real-weights", spec=str(root / "spec.yaml"), preprocess="inception",
                     splits=["train800", "val200", "train800val200", "test"], device="cpu", weights=weights, views=VIEWS)
    sidetune.extract("test_vit", "digits", root / "digits", pretrained=False, device="cpu", views=VIEWS,
                     splits=["train800", "val200", "train800val200", "test"])
    return {task: sidetune.open_cache(root / task) for task in ("real-weights", "digits")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for task, cache in caches().items():
        stored = cache.split("train800val200")
        plain_bytes = stored.num_images * stored.image_nbytes()
        for method, options in OPTIONS.items():
            for label, fields in VARIANTS.items():
                config = TrainConfig.create(method, options if task == "real-weights" else {}, epochs=args.epochs, **fields)
                started = time.perf_counter()
                [result] = train_group(cache, [config], "train800val200", "test", "cpu")
                views = fields["views"]
                rows.append({"task": task, "method": method, "variant": label, "test_top1": round(result.top1, 2),
                             "train_bytes": plain_bytes * (1 + views), "bytes": human_bytes(plain_bytes * (1 + views)),
                             "seconds": round(time.perf_counter() - started, 1)})
                print(rows[-1], flush=True)
    write_result("views", {"machine": machine(torch.device("cpu")), "epochs": args.epochs, "views_stored": VIEWS,
                           "rows": rows}, args.out)


if __name__ == "__main__":
    main()
