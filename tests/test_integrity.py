"""A cache cannot silently go wrong: every shard is checked against what was written with it, a
damaged shard or label array is named with its repair, and rerunning the extract command
repairs exactly the damage, to bitwise the original."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from test_resume import assert_same_store, small_shard_spec

import sidetune
from conftest import extract_tiny, python_path

SHARD = "train800val200/tokens/c/1/0/0/0"  # the second of four shards of 4 images


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """digits' first 8 + 8 images (train800val200: 16 images in shards of 4) and a spec file."""
    folder = tmp_path_factory.mktemp("integrity")
    spec = small_shard_spec(folder, shard_images=4)
    extract_tiny("digits", folder / "cache", spec=str(spec), limit=8)
    return folder / "cache", spec


@pytest.fixture
def cache(pristine, tmp_path):
    """A copy of the pristine cache to damage."""
    shutil.copytree(pristine[0], tmp_path / "cache")
    return tmp_path / "cache"


def repair(cache, pristine):
    extract_tiny("digits", cache, spec=str(pristine[1]), limit=8)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sidetune", *args], capture_output=True, text=True,
                          env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})


def load(cache):
    return sidetune.open_cache(cache).split("train800").load()


def test_every_shard_records_its_values_checksum_and_its_bytes(pristine):
    group = zarr.open_group(str(pristine[0] / "train800val200"), mode="r")
    from sidetune.cache.integrity import checksum

    for shard in range(4):
        assert group["shard_checksum"][shard] == checksum(group["tokens"][4 * shard:4 * shard + 4])
    assert group["shard_nbytes"][1] == (pristine[0] / SHARD).stat().st_size > 0


def test_a_deleted_shard_is_named_by_info_and_by_a_load_and_extract_repairs_it_bitwise(cache, pristine):
    (cache / SHARD).unlink()
    shown = cli("info", str(cache))
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    text = " ".join(shown.stderr.split())
    assert "damaged in split train800val200: shard 1 (images 4-7) is missing" in text
    assert "Rerun the `sidetune extract` command" in text
    with pytest.raises(sidetune.SidetuneError, match="shard 1 \\(images 4-7\\) is missing"):
        load(cache)
    repair(cache, pristine)
    assert_same_store(pristine[0], cache)
    assert (cache / SHARD).read_bytes() == (pristine[0] / SHARD).read_bytes()


def test_a_truncated_shard_is_named_and_repaired_bitwise(cache, pristine):
    with open(cache / SHARD, "r+b") as handle:
        handle.truncate(100)
    assert "holds 100 bytes where" in " ".join(cli("info", str(cache)).stderr.split())
    with pytest.raises(sidetune.SidetuneError, match="shard 1 .*holds 100 bytes"):
        load(cache)
    repair(cache, pristine)
    assert (cache / SHARD).read_bytes() == (pristine[0] / SHARD).read_bytes()
    assert np.array_equal(load(cache), load(pristine[0]))


def test_a_flipped_byte_is_found_by_a_load_and_by_info_verify_and_repaired(cache, pristine):
    data = bytearray((cache / SHARD).read_bytes())
    data[len(data) // 2] ^= 0xFF  # the size is unchanged: only reading it back tells
    (cache / SHARD).write_bytes(bytes(data))
    assert cli("info", str(cache)).returncode == 0  # the cheap check sees the right size
    verified = cli("info", "--verify", str(cache))
    assert verified.returncode == 2 and "Traceback" not in verified.stderr
    assert "shard 1 (images 4-7)" in " ".join(verified.stderr.split())
    with pytest.raises(sidetune.SidetuneError, match="shard 1 \\(images 4-7\\)"):
        load(cache)
    repair(cache, pristine)
    assert cli("info", "--verify", str(cache)).returncode == 0
    assert_same_store(pristine[0], cache)


def test_a_streamed_split_checks_each_shard_it_reads(cache):
    from sidetune.training.data import load_features

    (cache / SHARD).unlink()
    features = load_features(sidetune.open_cache(cache), "train800val200", [6], torch.device("cpu"), budget_bytes=1)
    with pytest.raises(sidetune.SidetuneError, match="shard 1 \\(images 4-7\\) is missing"):
        list(features.batches(4))


def test_damaged_labels_are_refused_and_extract_rewrites_them(cache, pristine):
    labels = zarr.open_group(str(cache / "val200"), mode="r+")["labels"]
    labels[0] = (labels[0] + 1) % 10
    with pytest.raises(sidetune.SidetuneError, match="labels of split val200 .* are damaged"):
        sidetune.open_cache(cache).split("val200").labels
    shown = cli("info", str(cache))
    assert shown.returncode == 2 and "labels of split val200" in " ".join(shown.stderr.split())
    repair(cache, pristine)
    assert_same_store(pristine[0], cache)


def test_a_sound_cache_rerun_reads_every_shard_and_skips_the_work(cache, pristine):
    done = cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", "digits", "--limit", "8", "--spec",
               str(pristine[1]), "--out", str(cache), "--workers", "0")
    assert done.returncode == 0, done.stderr
    assert "train800val200: already complete, every shard checked, skipped" in " ".join(done.stderr.split())
