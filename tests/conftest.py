"""Shared fixtures: a tiny timm ViT with weights on disk, generated image datasets, the device.

No test touches the network: the hub clients are forced offline before anything imports them.

Tests run on the CPU by default. `python -m pytest --device cuda` runs every test that trains or
extracts on the GPU: the `device` fixture, and `auto` everywhere else (the API's and CLI's
default). Without `--device cuda` the GPU is hidden from the tests (CUDA_VISIBLE_DEVICES is
emptied before anything initialises CUDA), so `auto` means the CPU."""

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


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="Where tests train and extract: cpu (default) or cuda.")


_DEVICE = ["cpu"]


def pytest_configure(config):
    _DEVICE[0] = config.getoption("--device")
    if _DEVICE[0] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda was given but torch sees no CUDA GPU.")


def device_under_test() -> torch.device:
    """The device the tests train and extract on: `--device` (cpu by default)."""
    return torch.device(_DEVICE[0])


@pytest.fixture(scope="session")
def device() -> torch.device:
    return device_under_test()


def python_path() -> str:
    """PYTHONPATH for a child process: the project first, then whatever this one was given
    (the GPU machine finds zarr and datasets on a carried path)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def sidetune_cli(*args, cwd=None):
    """`python -m sidetune ARGS` as a user runs it, offline; output captured."""
    import subprocess
    import sys

    env = {"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sidetune", *args], capture_output=True, text=True, env=env, cwd=cwd)


def float32_spec(folder: Path, name: str = "exact", **fields) -> str:
    """A spec file of one's own, float32 so cached tokens can be compared exactly: every stage and
    token unless `fields` say otherwise."""
    path = folder / f"{name}.yaml"
    lines = {"stages": "all", "tokens": "all", "dtype": "float32", "shard_images": 4, **fields}
    path.write_text("".join(f"{key}: {value}\n" for key, value in lines.items()))
    return str(path)


def extract_tiny(dataset, out, **options):
    """`sidetune.extract` with test_vit (seeded random weights unless `weights` is given),
    in-process image loading; any extract option can be overridden."""
    import sidetune

    options.setdefault("pretrained", False)
    options.setdefault("workers", 0)
    return sidetune.extract(options.pop("model", TINY_MODEL), str(dataset), out, **options)


def assert_live_run_predicts_its_cached_logits(model: str, spec: str, folder: Path, tmp_path: Path, train_config) -> None:
    """A VTAB-style folder through `model` with its test split left live: a run of
    `train_config` scores test through the backbone, and `predict` on the test images gives the
    logits the run's side network gives on a cached copy of the split."""
    import json

    import sidetune
    from sidetune.predict import predict
    from sidetune.runs import open_run
    from sidetune.training import TrainConfig, restore_sidenet

    options = {"spec": spec, "pretrained": False, "workers": 0}
    sidetune.extract(model, str(folder), tmp_path / "live", **options)
    run_dir, result = sidetune.train(tmp_path / "live", train_config, out=tmp_path / "run")
    assert json.loads((run_dir / "metrics.json").read_text())["eval_split"] == "test" and result.top1 is not None
    sidetune.extract(model, str(folder), tmp_path / "cached", splits=["test"], **options)
    cached = torch.from_numpy(sidetune.open_cache(tmp_path / "cached").split("test").load())
    run = open_run(run_dir)
    net = restore_sidenet(run.cache_info, TrainConfig.from_record(run.config["config"]), run.state())
    paths = [folder / line.split()[0] for line in (folder / "test.txt").read_text().splitlines()]
    with torch.no_grad():
        torch.testing.assert_close(torch.stack([p.logits for p in predict(run_dir, paths)]), net(cached)[0].float(),
                                   atol=1e-4, rtol=1e-4)


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


def assert_plot_drawn(path: Path) -> None:
    """`path` is a PNG with data drawn on it: pixels in matplotlib's first colour (C0), which
    empty axes do not have."""
    import numpy as np
    from PIL import Image

    image = Image.open(path)
    assert image.format == "PNG", path
    pixels = np.asarray(image.convert("RGB")).astype(int)
    near_c0 = (np.abs(pixels - np.array([31, 119, 180])).sum(-1) < 40).sum()
    assert near_c0 > 50, f"{path} shows no data ({near_c0} pixels in C0)"


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
    from sidetune.sidenets import method_options
    from sidetune.training import TrainConfig

    options = {k: fields.pop(k) for k in list(fields) if k in method_options(method)}
    fields.setdefault("warmup_epochs", 1)
    return TrainConfig.create(method, options, epochs=epochs, **fields)


def train_on_digits(cache, configs, epochs=4):
    """Train dicts of TrainConfig fields, method options (rank, pool, ...) mixed in."""
    from sidetune.training import train_group

    return train_group(cache, [config(epochs=epochs, **c) for c in configs], "train800", "val200", device_under_test())
