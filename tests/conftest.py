"""Shared fixtures: a tiny timm ViT with weights on disk, generated image datasets.

No test touches the network: the hub clients are forced offline before anything imports them."""

import os
import zlib

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("SIDETUNE_DATA", None)

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

TINY_MODEL = "test_vit"
ROOT = Path(__file__).resolve().parents[1]


def extract_tiny(dataset, out, **options):
    """`sidetune.extract` with test_vit (seeded random weights unless `weights` is given),
    in-process image loading; any extract option can be overridden."""
    import sidetune

    options.setdefault("pretrained", False)
    options.setdefault("workers", 0)
    return sidetune.extract(options.pop("model", TINY_MODEL), str(dataset), out, **options)


def tiny_vit(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY_MODEL, pretrained=False, num_classes=0).eval()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """test_vit weights (seed 1, unlike sidetune's random init) saved as safetensors."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(path))
    return path


def write_image(path: Path, seed: int, size: int = 24) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def class_folder(tmp_path) -> Path:
    """3 classes x 5 images in class sub-folders (no split folders)."""
    root = tmp_path / "shapes"
    for label, name in enumerate(["circle", "square", "triangle"]):
        for i in range(5):
            write_image(root / name / f"{i}.png", seed=10 * label + i)
    return root


def write_vtab_folder(root: Path, seed: int = 0) -> Path:
    """A VTAB-1k style folder: images plus the four list files (12 train, 4 val, 6 test), 4 labels."""
    lines = {}
    for split, count in (("train800", 12), ("val200", 4), ("test", 6)):
        lines[split] = []
        for i in range(count):
            relative = f"images/{split}_{i}.jpg"
            write_image(root / relative, seed=zlib.crc32(f"{split}{i}".encode()) + seed)
            lines[split].append(f"{relative} {i % 4}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        (root / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
    return root


@pytest.fixture
def vtab_folder(tmp_path) -> Path:
    return write_vtab_folder(tmp_path / "mytask")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """digits (train800, val200, test) through the random test_vit, every stage and token."""
    import sidetune

    out = tmp_path_factory.mktemp("stage2") / "digits"
    extract_tiny("digits", out, splits=["train800", "val200", "test"])
    return sidetune.open_cache(out)


def config(method: str = "linear", epochs: int = 4, **fields):
    """A TrainConfig for tests: method options and training fields mixed, short warmup."""
    from sidetune.engine import TrainConfig
    from sidetune.sidenets import method_options

    options = {k: fields.pop(k) for k in list(fields) if k in method_options(method)}
    fields.setdefault("warmup_epochs", 1)
    return TrainConfig.create(method, options, epochs=epochs, **fields)
