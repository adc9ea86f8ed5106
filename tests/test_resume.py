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
from sidetune.errors import Interrupted
from sidetune.progress import ProgressSink


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

    with pytest.raises(Interrupted):
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


def extract_command(spec: Path) -> list[str]:
    return [sys.executable, "-m", "sidetune", "extract", "--model", "test_vit", "--no-pretrained",
            "--dataset", "digits", "--splits", "test", "--limit", "400", "--spec", str(spec),
            "--batch-size", "2", "--workers", "0", "--device", "cpu"]


def shards_done(cache: Path) -> int:
    marks = cache / "test" / "shard_complete"
    return int(zarr.open_array(str(marks), mode="r")[:].sum()) if (marks / "zarr.json").exists() else 0


def test_extract_killed_again_and_again_at_random_moments_always_opens_and_ends_identical(tmp_path):
    """kill -9 at random moments (while creating the store, writing shards or the manifest): the
    cache opens after every kill, and the finished cache is bitwise the uninterrupted one."""
    command, env = extract_command(small_shard_spec(tmp_path)), {**os.environ, "PYTHONPATH": python_path()}
    subprocess.run([*command, "--out", str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    out, rng, opened = tmp_path / "killed", np.random.default_rng(7), 0
    for attempt in range(5):
        victim = subprocess.Popen([*command, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 0:  # anywhere in start-up, store creation included
            time.sleep(rng.uniform(0.5, 3.0))
        else:  # once this run writes shards: between shards, and while it rewrites the manifest
            before, deadline = shards_done(out), time.monotonic() + 60
            while shards_done(out) <= before and victim.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        if (out / "sidetune.json").exists():  # created: from now on it must always open
            cache = sidetune.open_cache(out)
            opened += 1
            assert cache.manifest["format_version"] == 2
    assert opened >= 3, "too few kills came after the cache was created; the test proves little"
    assert not sidetune.open_cache(out).split("test").complete, "a kill came too late to interrupt anything"
    subprocess.run([*command, "--out", str(out)], check=True, env=env, capture_output=True)
    assert_same_store(tmp_path / "straight", out)


def test_a_second_extract_into_a_cache_being_written_is_refused(tmp_path):
    command, env = extract_command(small_shard_spec(tmp_path)), {**os.environ, "PYTHONPATH": python_path()}
    writer = subprocess.Popen([*command, "--out", str(tmp_path / "cache")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "cache" / "sidetune.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.poll() is None, "the first extract ended before the second began"
        with pytest.raises(sidetune.SidetuneError, match="is being written by sidetune extract .pid"):
            sidetune.extract("test_vit", "digits", tmp_path / "cache", splits=["test"], limit=400,
                             spec=str(small_shard_spec(tmp_path)), batch_size=2, workers=0, pretrained=False, device="cpu")
        assert writer.poll() is None  # the first one goes on, untouched
    finally:
        writer.kill()
        writer.wait()


def test_a_finished_extract_leaves_no_lock_and_the_next_writer_gets_one(tmp_path):
    spec = str(small_shard_spec(tmp_path))
    options = dict(splits=["test"], limit=40, spec=spec, batch_size=2, workers=0, pretrained=False, device="cpu")
    sidetune.extract("test_vit", "digits", tmp_path / "cache", **options)
    assert not (tmp_path / "cache" / "extract.lock").exists()
    sidetune.extract("test_vit", "digits", tmp_path / "cache", **options)  # reopened, nothing refused
    assert not (tmp_path / "cache" / "extract.lock").exists() and sidetune.open_cache(tmp_path / "cache").split("test").complete
