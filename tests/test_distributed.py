"""Beyond one process: `torchrun -m sidetune ...` with 2 gloo processes on the CPU."""

import json
import os
import subprocess
import sys
import time

import pytest
import zarr
from test_resume import CountImages, assert_same_store, small_shard_spec

import sidetune
from conftest import extract_tiny, python_path, write_vtab_folder
from sidetune.cache.location import Location
from sidetune.cache.store import SplitWriter
from sidetune.extract import ShardMonitor


def torchrun(*arguments: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=N -m sidetune ARGUMENTS`, as a user runs it."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path(), "COLUMNS": "400",
                   "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, also on a GPU machine with fewer GPUs than ranks
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "sidetune", *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


@pytest.fixture(scope="module")
def vtab_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "digits"
    extract_tiny("digits", out, limit=64)
    return sidetune.open_cache(out)


def test_a_torchrun_sweep_shares_configs_between_ranks_and_rank0_merges_them(vtab_digits, tmp_path):
    grid = ["--method", "linear", "--lr", "0.01,0.03,0.1,0.3", "--epochs", "2", "--protocol", "none",
            "--train-split", "train800", "--eval-split", "val200"]
    finished = torchrun("sweep", "--cache", str(vtab_digits.path), *grid, "--out", str(tmp_path / "two"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [[json.loads(line) for line in (tmp_path / "two" / "ranks" / f"rank-{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert [sorted(row["config_id"] for row in rows) for rows in ranks] == [[0, 1], [2, 3]]
    merged = [json.loads(line) for line in (tmp_path / "two" / "results.jsonl").read_text().splitlines()]
    assert [row["process_rank"] for row in merged] == [0, 0, 1, 1]

    alone = sidetune.sweep(vtab_digits, sidetune.expand_grid("linear", {"lr": [0.01, 0.03, 0.1, 0.3]}, {"epochs": 2}),
                           out=tmp_path / "one", protocol="none", train_split="train800", eval_split="val200")
    assert [row["top1"] for row in merged] == [row.top1 for row in alone.rows]
    assert finished.stderr.count("Best:") == 1  # only rank 0 reports


def test_a_torchrun_extraction_equals_a_one_process_extraction_bitwise(tmp_path):
    folder, spec = write_vtab_folder(tmp_path / "task"), small_shard_spec(tmp_path, shard_images=4)
    extract_tiny(folder, tmp_path / "one", spec=str(spec), device="cpu")  # torchrun's ranks run on the CPU
    finished = torchrun("extract", "--model", "test_vit", "--no-pretrained", "--dataset", str(folder),
                        "--out", str(tmp_path / "two"), "--spec", str(spec), "--workers", "0")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_store(tmp_path / "one", tmp_path / "two")
    assert all(split.complete for split in sidetune.open_cache(tmp_path / "two").splits.values())


def test_a_failed_rank_leaves_its_shards_to_a_rerun_with_another_world_size(tmp_path):
    folder, spec = write_vtab_folder(tmp_path / "task"), small_shard_spec(tmp_path, shard_images=4)
    extract_tiny(folder, tmp_path / "clean", spec=str(spec), device="cpu")
    broken = folder / "images" / "train800_9.jpg"  # in train800's last shard: rank 1's share
    original = broken.read_bytes()
    broken.write_bytes(b"x" * len(original))  # same size: the dataset's fingerprint is unchanged
    failed = torchrun("extract", "--model", "test_vit", "--no-pretrained", "--dataset", str(folder),
                      "--out", str(tmp_path / "cache"), "--spec", str(spec), "--workers", "0")
    assert failed.returncode != 0 and "train800_9.jpg" in failed.stderr
    assert not sidetune.open_cache(tmp_path / "cache").split("train800").complete

    broken.write_bytes(original)
    extract_tiny(folder, tmp_path / "cache", spec=str(spec), device="cpu")  # one process finishes what is missing
    assert_same_store(tmp_path / "clean", tmp_path / "cache")


def test_rank0s_progress_counts_the_shards_any_rank_has_written(tmp_path):
    extract_tiny("digits", tmp_path / "cache", splits=["val200"], limit=16, spec=str(small_shard_spec(tmp_path, 4)))
    group = zarr.open_group(str(tmp_path / "cache" / "val200"), mode="r+")
    tokens, absmax = group["tokens"][:], group["shard_absmax"][:]
    group["shard_complete"][:] = 0  # as if no rank had written anything yet
    split = SplitWriter("val200", group, 16, 4, Location(str(tmp_path / "cache")))
    counted = CountImages()
    with ShardMonitor(split, [0, 1, 2, 3], counted, every=0.01):
        for shard in (0, 3):  # written by "other ranks": the monitor only sees the store
            split.write_shard(shard, tokens[shard * 4:(shard + 1) * 4], absmax[shard])
        time.sleep(0.2)
        assert counted.images == 8
        split.write_shard(1, tokens[4:8], absmax[1])
    assert counted.images == 12  # the last poll on exit; shard 2 is still missing


def test_train_under_torchrun_is_refused_with_the_way_to_share_configs(vtab_digits, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(sidetune.SidetuneError, match="-m sidetune sweep"):
        sidetune.train(vtab_digits, sidetune.TrainConfig.create("linear", epochs=1), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
