"""A cache on a disk too small for it: refused before any compute, with what would fit; and a
disk that fills during the run loses nothing and resumes to the uninterrupted cache.

These run on a real small filesystem: a tmpfs mounted for the test (the tests run as root, as
CI does). Where no tmpfs can be mounted they fail loudly rather than pass without checking."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_resume import assert_same_store, small_shard_spec

import sidetune
from conftest import extract_tiny, python_path
from sidetune.progress import ProgressSink


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"These tests need a small real filesystem, but mounting a 3 MB tmpfs failed "
                    f"({done.stderr.strip() or done.returncode}); run the tests as root, as CI does.")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_cache_too_big_for_the_disk_is_refused_before_any_compute_naming_what_fits(small_disk):
    outcome = subprocess.run([sys.executable, "-m", "sidetune", "extract", "--model", "test_vit", "--no-pretrained",
                              "--dataset", "digits", "--out", str(small_disk / "digits"), "--workers", "0"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": python_path(), "COLUMNS": "400"})
    assert outcome.returncode == 2, outcome.stdout + outcome.stderr
    message = " ".join((outcome.stdout + outcome.stderr).split())
    assert "would take 90.5 MB" in message and "free there" in message
    assert "--spec cls" in message and "--spec default" not in message  # cls (one token) fits, every token does not
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert not any(path.name == "tokens" for path in small_disk.rglob("*"))


class FillTheDiskAfter(ProgressSink):
    """Another process's file takes the disk's free space once `images` images are done."""

    def __init__(self, disk: Path, images: int):
        self.disk, self.left = disk, images

    def advance(self, images: int) -> None:
        self.left -= images
        if self.left <= 0 and not (self.disk / "other-process.bin").exists():
            free = os.statvfs(self.disk).f_bavail * os.statvfs(self.disk).f_frsize
            (self.disk / "other-process.bin").write_bytes(b"\0" * max(free - 4096, 0))


def test_a_disk_that_fills_during_extraction_keeps_every_finished_shard_and_resumes_identically(small_disk, tmp_path):
    spec = small_shard_spec(tmp_path, shard_images=4)  # 4 images of 90 KB per shard
    options = dict(splits=["val200"], limit=24, spec=str(spec), batch_size=4)
    extract_tiny("digits", tmp_path / "straight", **options)
    with pytest.raises(sidetune.SidetuneError, match="filled up during extraction. Every finished shard is kept"):
        extract_tiny("digits", small_disk / "cache", progress=FillTheDiskAfter(small_disk, 16), **options)
    split = sidetune.open_cache(small_disk / "cache").split("val200")
    assert not split.complete and 2 <= split.shards_done < 6  # two shards in flight at most: the first two are written

    (small_disk / "other-process.bin").unlink()
    extract_tiny("digits", small_disk / "cache", **options)
    assert_same_store(tmp_path / "straight", small_disk / "cache")
