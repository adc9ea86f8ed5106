"""The command line as a user types it."""

import json
import subprocess
import sys

import sidetune
from conftest import python_path


def sidetune_cli(*args, cwd=None):
    env = {"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sidetune", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_extract_then_info_shows_splits_sizes_and_completion(tmp_path):
    result = sidetune_cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", "digits",
                          "--splits", "val200,test", "--limit", "16", "--spec", "cls", "--workers", "0",
                          "--out", str(tmp_path / "digits"))
    assert result.returncode == 0, result.stderr
    info = sidetune_cli("info", str(tmp_path / "digits"))
    assert info.returncode == 0, info.stderr
    for text in ("test_vit", "val200", "(16, 7, 1, 64)", "complete", "vtab: 160x160 bicubic"):
        assert text in info.stderr


def test_extract_defaults_to_cache_slash_dataset_in_the_working_directory(tmp_path):
    result = sidetune_cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", "digits",
                          "--splits", "test", "--limit", "4", "--spec", "cls", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sidetune.open_cache(tmp_path / "cache" / "digits").split("test").complete


def test_info_json_prints_the_manifest(tmp_path):
    sidetune.extract("test_vit", "digits", tmp_path / "c", splits=["test"], limit=4, spec="cls",
                     pretrained=False, workers=0)
    result = sidetune_cli("info", str(tmp_path / "c"), "--json")
    manifest = json.loads(result.stdout)
    assert manifest["format_version"] == 2 and manifest["splits"]["test"]["complete"] is True


def test_info_on_a_missing_cache_says_how_to_create_one(tmp_path):
    result = sidetune_cli("info", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "sidetune extract" in result.stderr


def test_demo_runs_end_to_end_offline(tmp_path):
    result = sidetune_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "runs" / "digits-demo" / "metrics.json").read_text())
    assert metrics["eval_split"] == "test" and metrics["top1"] > 30.0  # test scored live; chance is 10%
    assert sidetune.open_cache(tmp_path / "cache" / "digits").split("test").kind == "live"


ALLOCATION_STEPS = """
import resource, sys, torch
from cli.main import main
sys.argv = ["sidetune", "models"]
try:
    main()
except SystemExit:
    pass

def step():  # a CPU training step's activations: six 20 MiB tensors, freed together
    tensors = [torch.ones(5 << 20) for _ in range(6)]
    del tensors

step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_command_line_keeps_freed_memory_so_repeated_steps_stop_faulting_pages():
    def faults(**env):
        done = subprocess.run([sys.executable, "-c", ALLOCATION_STEPS], capture_output=True, text=True,
                              env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", **env})
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    kept, default = faults(), faults(SIDETUNE_MALLOC="default")
    assert default > 50_000  # glibc's own settings: every step maps and faults its pages again
    assert kept * 10 < default  # the command line's: steps reuse the memory the previous one freed
