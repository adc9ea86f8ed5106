"""scikit-learn's bundled handwritten digits: offline, tiny, with VTAB-1k-shaped splits."""

from __future__ import annotations

import numpy as np

from sidetune.datasets.sources import ArraySplit, ImageSource

DIGITS_SEED = 0


def load_digits_source() -> ImageSource:
    """1797 8x8 grey digits as RGB uint8 images. A seeded permutation gives train800, val200,
    train800val200 (their union, in that order) and test (the remaining 797)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
    parts = {
        "train800": order[:800],
        "val200": order[800:1000],
        "train800val200": order[:1000],
        "test": order[1000:],
    }
    splits = {name: ArraySplit(images[idx], labels[idx], f"digits/{name}") for name, idx in parts.items()}
    return ImageSource(
        name="digits",
        source="sklearn:load_digits",
        class_names=[str(i) for i in range(10)],
        splits=splits,
        notes=[f"seeded permutation (seed {DIGITS_SEED}) into VTAB-1k-shaped splits"],
    )
