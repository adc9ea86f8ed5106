"""What the benchmark scripts share: generated image folders and the random-test_vit task
caches built from them, child processes that report their own peak memory, machine
descriptions and JSON results.

Each measured case runs in a fresh child process (`python SCRIPT --child CASE ...`) so its peak
memory (RSS on CPU, max allocated on GPU) is its own; the parent compares the children of one
run, so every figure is a ratio measured on the same machine at the same time."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from sidetune.compute import proc_bytes

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / ".work"  # generated images and caches (git-ignored)


def generated_images(folder: Path, count: int, classes: int = 4, size: int = 224) -> Path:
    """A class-per-folder image dataset of `count` seeded noise images (class-tinted), once."""
    from PIL import Image

    marker = folder / f".complete-{count}-{classes}-{size}"
    if marker.exists():
        return folder
    rng = np.random.default_rng(0)
    for index in range(count):
        label = index % classes
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels[..., label % 3] //= 2  # a weak class signal
        path = folder / f"class{label}" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    marker.touch()
    return folder


def vtab_style_folder(folder: Path) -> Path:
    """A VTAB-style folder of 1200 generated 64x64 images, 4 classes: list files for train800,
    val200, train800val200 and a 200-image test split."""
    images = generated_images(folder / "images", 1200, classes=4, size=64)
    paths = sorted(images.rglob("*.png"), key=lambda p: int(p.stem))
    lines = [f"{path.relative_to(folder)} {int(path.parent.name.removeprefix('class'))}" for path in paths]
    parts = {"train800": lines[:800], "val200": lines[800:1000], "train800val200": lines[:1000], "test": lines[1000:]}
    for split, split_lines in parts.items():
        (folder / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
    return folder


def random_vit_caches(prefix: str) -> dict:
    """The two small benchmark tasks through the random test_vit (every stage and token):
    digits and a generated VTAB-style folder, extracted (or resumed) into WORK/<prefix>-<task>."""
    import sidetune

    tasks = {"digits": "digits", "generated": str(vtab_style_folder(WORK / "halving-task"))}
    caches = {}
    for task, dataset in tasks.items():
        path = WORK / f"{prefix}-{task}"
        sidetune.extract("test_vit", dataset, path, pretrained=False, device="cpu")
        caches[task] = sidetune.open_cache(path)
    return caches


def peak_memory(device: torch.device) -> int:
    """Bytes: this process's peak RSS on CPU, or the peak allocated GPU memory.

    On Linux the peak is VmHWM, which starts afresh at exec; getrusage's ru_maxrss would carry
    the parent's peak into every child process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(script: Path, case: str, arguments: dict) -> dict:
    """Run `script --child CASE --args JSON` in a fresh process; its last stdout line is JSON."""
    command = [sys.executable, str(script), "--child", case, "--args", json.dumps(arguments)]
    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(script.parents[1]), os.environ.get("PYTHONPATH")) if p)})
    if finished.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def machine(device: torch.device) -> dict:
    record = {"device": device.type, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def write_result(name: str, record: dict, out: Path | None = None) -> Path:
    out = out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, **record}, indent=2) + "\n")
    print(f"wrote {out}")
    return out
