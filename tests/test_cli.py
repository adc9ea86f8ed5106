"""The command line as a user types it."""

import json
import re
import subprocess
import sys

import sidetune
from conftest import python_path, sidetune_cli


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


MMAPPED_BY_A_20_MIB_BLOCK = """
import ctypes, sys
if sys.argv[1] == "after-the-cli":
    from cli.main import main
    sys.argv = ["sidetune", "models"]
    try:
        main()
    except SystemExit:
        pass

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblkhd  # bytes in blocks glibc mapped on their own (and unmaps when freed)
block = libc.malloc(20 << 20)  # a training step's activation
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


def test_the_command_line_serves_a_steps_blocks_from_memory_it_keeps_not_from_fresh_mappings():
    """glibc maps a fresh 20 MiB block on its own (page faults on every step that allocates it
    again); after the command line starts, it comes from the heap, whose freed memory is kept."""
    def mapped_mib(how):
        done = subprocess.run([sys.executable, "-c", MMAPPED_BY_A_20_MIB_BLOCK, how], capture_output=True, text=True,
                              env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    assert mapped_mib("bare-python") == 20
    assert mapped_mib("after-the-cli") == 0


def test_train_and_sweep_show_a_progress_bar_with_throughput_for_the_live_test_split(tmp_path, vtab_folder):
    cache = str(tmp_path / "cache")
    assert sidetune_cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", str(vtab_folder),
                        "--out", cache).returncode == 0
    trained = sidetune_cli("train", "--cache", cache, "--method", "linear", "--epochs", "1", "--out", str(tmp_path / "run"))
    swept = sidetune_cli("sweep", "--cache", cache, "--method", "linear", "--lr", "0.1,0.3", "--epochs", "1",
                         "--out", str(tmp_path / "sweep"))
    for done in (trained, swept):
        assert done.returncode == 0, done.stderr
        assert re.search(r"test \(live\).*images 6/6.* [\d,]+ img/s", done.stderr), done.stderr
