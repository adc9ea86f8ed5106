"""Beyond one process: `torchrun -m sidetune ...` with 2 gloo processes on the CPU."""

import json
import os
import subprocess
import sys

import pytest

import sidetune
from conftest import ROOT, extract_tiny


def torchrun(*arguments: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=N -m sidetune ARGUMENTS`, as a user runs it."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
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
