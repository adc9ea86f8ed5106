"""An interrupted extract resumes without recomputing finished shards and ends bitwise
identical to an uninterrupted run; a split is complete only when all its shards are."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import sidetune
from conftest import python_path
from sidetune.extract import ProgressSink


def small_shard_spec(tmp_path: Path, shard_images: int = 8) -> Path:
    spec = tmp_path / "small_shards.yaml"
    spec.write_text(f"stages: all\ntokens: all\ndtype: float16\nshard_images: {shard_images}\n")
    return spec


def assert_same_store(a: Path, b: Path) -> None:
    """The same manifest (but its creation time) and, bit for bit, the same arrays in every split."""
    manifest_a, manifest_b = (dict(sidetune.open_cache(path).manifest) for path in (a, b))
    manifest_a.pop("created"), manifest_b.pop("created")
    assert manifest_a == manifest_b
    left, right = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for split in manifest_a["splits"]:
        names = sorted(left[split].array_keys())
        assert names == sorted(right[split].array_keys()), split
        for name in names:
            assert left[split][name][:].tobytes() == right[split][name][:].tobytes(), f"{split}/{name}"


class InterruptAfter(ProgressSink):
    """Acts like Ctrl-C after `images` images have gone through the backbone."""

    def __init__(self, images: int):
        self.left = images

    def advance(self, images: int) -> None:
        self.left -= images
        if self.left <= 0:
            raise KeyboardInterrupt


class CountImages(ProgressSink):
    def __init__(self):
        self.images = 0

    def advance(self, images: int) -> None:
        self.images += images


def run(out, spec, progress=None):
    return sidetune.extract("test_vit", "digits", out, splits=["val200", "test"], limit=40, spec=str(spec),
                            pretrained=False, workers=0, batch_size=4, progress=progress)


def test_interrupted_extract_resumes_to_an_identical_store(tmp_path):
    spec = small_shard_spec(tmp_path)
    run(tmp_path / "straight", spec)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", spec, InterruptAfter(images=20))  # mid-way through val200's 3rd shard
    partial = sidetune.open_cache(tmp_path / "resumed")
    assert not partial.split("val200").complete
    assert partial.split("val200").shards_done == 2
    with pytest.raises(sidetune.SidetuneError, match="incomplete"):
        partial.split("val200").load()

    counter = CountImages()
    reports = run(tmp_path / "resumed", spec, counter)
    assert counter.images == 40 + 40 - 16  # the two finished shards were not recomputed
    assert [r.shards_skipped for r in reports] == [2, 0]
    assert_same_store(tmp_path / "straight", tmp_path / "resumed")


def test_rerun_of_a_complete_cache_computes_nothing(tmp_path):
    spec = small_shard_spec(tmp_path)
    run(tmp_path / "cache", spec)
    counter = CountImages()
    reports = run(tmp_path / "cache", spec, counter)
    assert counter.images == 0 and all(r.complete for r in reports)


def test_killed_extract_process_resumes_to_an_identical_store(tmp_path):
    spec = small_shard_spec(tmp_path)
    command = [sys.executable, "-m", "sidetune", "extract", "--model", "test_vit", "--no-pretrained",
               "--dataset", "digits", "--splits", "test", "--limit", "400", "--spec", str(spec),
               "--batch-size", "2", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": python_path()}
    subprocess.run([*command, "--out", str(tmp_path / "straight")], check=True, env=env, capture_output=True)

    victim = subprocess.Popen([*command, "--out", str(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_array = tmp_path / "killed" / "test" / "shard_complete" / "zarr.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if done_array.exists() and zarr.open_array(str(done_array.parent), mode="r")[:].sum() >= 2:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = sidetune.open_cache(tmp_path / "killed").split("test")
    assert not killed.complete, "the process finished before it could be killed; the test proves nothing"
    assert 0 < killed.shards_done < 50

    subprocess.run([*command, "--out", str(tmp_path / "killed")], check=True, env=env, capture_output=True)
    assert_same_store(tmp_path / "straight", tmp_path / "killed")
