"""The command line as a user types it."""

import json
import re
import subprocess
import sys

from typer.testing import CliRunner

import sidetune
from cli.main import app
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


def test_demo_runs_end_to_end_offline_and_keeps_an_earlier_demo_run(tmp_path):
    result = sidetune_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "runs" / "digits-demo" / "metrics.json").read_text())
    assert metrics["eval_split"] == "test" and metrics["top1"] > 30.0  # test scored live; chance is 10%
    assert sidetune.open_cache(tmp_path / "cache" / "digits").split("test").kind == "live"
    (tmp_path / "runs" / "digits-demo" / "eval-test.json").write_text("{}")  # what a user did with the run since
    again = sidetune_cli("demo", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "runs" / "digits-demo" / "eval-test.json").read_text() == "{}"  # kept, as it was
    [second] = [path for path in (tmp_path / "runs").iterdir() if path.name.startswith("digits-demo-")]
    assert (second / "metrics.json").is_file() and "earlier demo run" in " ".join(again.stderr.split())


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


def test_every_declared_method_option_is_a_flag_of_train_and_of_sweep_with_its_declared_help():
    import typer.main

    from cli.main import app
    from sidetune.declarations import declared_options

    commands = {command.name: command for command in typer.main.get_command(app).commands.values()}
    flags = {name: {param.name: param for param in commands[name].params} for name in ("train", "sweep")}
    for option in declared_options().values():
        assert option.describe() in flags["train"][option.name].help
        if option.kind is not bool:  # booleans are not swept
            assert flags["sweep"][option.name].help.startswith(option.describe())


def test_a_newly_registered_side_network_gets_its_options_as_flags_without_touching_the_command_line(monkeypatch):
    import inspect

    from cli.method_options import with_method_options
    from sidetune.sidenets import SIDENETS, LinearProbe

    class Wide(LinearProbe):
        name = "wide"
        option_help = {"width_factor": "how much wider than the backbone"}

        def __init__(self, layout, num_configs, pool="cls", standardize=True, width_factor=2):
            super().__init__(layout, num_configs, pool, standardize)

    monkeypatch.setitem(SIDENETS, "wide", Wide)
    received = {}

    def command(method: str = "linear", **options) -> None:
        received.update(options, method=method)

    generated = with_method_options("train")(command)
    parameter = inspect.signature(generated).parameters["width_factor"]
    assert parameter.default.help == "wide: how much wider than the backbone (default 2)."
    generated(method="wide", width_factor=3, rank=None)
    assert received == {"method": "wide", "width_factor": 3}  # options left at None are not passed


def test_a_side_network_option_without_help_is_refused_naming_it(monkeypatch):
    import pytest

    from sidetune.declarations import declared_options
    from sidetune.sidenets import SIDENETS, LinearProbe

    class Undocumented(LinearProbe):
        name = "undocumented"

        def __init__(self, layout, num_configs, pool="cls", standardize=True, mystery=1):
            super().__init__(layout, num_configs, pool, standardize)

    monkeypatch.setitem(SIDENETS, "undocumented", Undocumented)
    with pytest.raises(TypeError, match="Undocumented declares no option_help for its option 'mystery'"):
        declared_options()


def test_docs_cli_names_every_method_option_flag():
    from pathlib import Path

    from sidetune.declarations import declared_options

    text = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    missing = [name for name in declared_options() if "--" + name.replace("_", "-") not in text]
    assert not missing, missing


def test_methods_lists_every_method_with_its_declared_options_and_default_grid():
    from sidetune.sidenets import SIDENETS, method_options

    listed = json.loads(CliRunner().invoke(app, ["methods", "--json"]).output)
    assert [entry["method"] for entry in listed] == list(SIDENETS)
    last = next(entry for entry in listed if entry["method"] == "last")
    assert {o["name"]: o["default"] for o in last["options"]} == method_options("last")
    assert last["default_grid"]["rank"] == [8, 16] and all(o["help"] for o in last["options"])
    table = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "160"}).output
    assert all(name in table for name in SIDENETS) and "--no-zero-init-out" in table and "--rank 16" in table


A_NEW_METHOD = '''
import sys
from sidetune.sidenets import SIDENETS
from sidetune.sidenets.linear import LinearProbe

class ScaledProbe(LinearProbe):  # the whole method: its file, then one registration
    name = "scaled"
    summary = "a linear probe on its features times a fixed factor"
    option_help = {"factor": "the factor the pooled features are multiplied by"}
    default_grid = {"lr": [0.1], "factor": [1.0, 2.0]}

    def __init__(self, layout, num_configs, pool="cls", standardize=True, factor=2.0):
        super().__init__(layout, num_configs, pool, standardize)
        self.factor = factor

    def pooled_features(self, tokens):
        return super().pooled_features(tokens) * self.factor

SIDENETS["scaled"] = ScaledProbe
from cli.main import main
sys.argv = ["sidetune", *sys.argv[1:]]
main()
'''


def test_a_new_method_is_its_file_and_its_registration(digits_cache, tmp_path):
    script = tmp_path / "with_scaled.py"
    script.write_text(A_NEW_METHOD)

    def cli(*args):
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "200"})

    assert "--factor" in cli("train", "--help").stdout and "--factor" in cli("sweep", "--help").stdout
    listed = {entry["method"]: entry for entry in json.loads(cli("methods", "--json").stdout)}
    assert listed["scaled"]["default_grid"] == {"lr": [0.1], "factor": [1.0, 2.0]}
    refused = cli("sweep", "--cache", str(digits_cache.path), "--method", "scaled", "--factor", "-1,2")
    assert refused.returncode == 2 and "--factor got -1; it must be at least 0.0" in " ".join(refused.stderr.split())
    done = cli("train", "--cache", str(digits_cache.path), "--method", "scaled", "--factor", "3", "--epochs", "1",
               "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["factor"] == 3.0
    swept = cli("sweep", "--cache", str(digits_cache.path), "--method", "scaled", "--epochs", "1", "--protocol", "none",
                "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "sweep"))
    assert swept.returncode == 0, swept.stdout + swept.stderr
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert sorted(row["factor"] for row in rows) == [1.0, 2.0]  # the method's own default grid
    assert "--factor" in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["train_command"]


def test_no_progress_bar_is_drawn_before_the_options_are_checked(digits_cache):
    refused = sidetune_cli("train", "--cache", str(digits_cache.path), "--method", "linear", "--epochs", "3",
                           "--train-split", "nosuch")
    assert refused.returncode == 2 and "has no training split 'nosuch'" in refused.stderr
    assert "epoch" not in refused.stderr.split("error:")[0]  # nothing drawn before the error


def test_tables_at_80_columns_keep_split_names_whole_instead_of_cutting_them(digits_cache, tmp_path):
    narrow = {"COLUMNS": "80"}
    shown = CliRunner().invoke(app, ["info", str(digits_cache.path)], env=narrow)
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.output, shown.output  # before: train800 and train800val200 both as train8…
    rows = [line.split() for line in shown.output.splitlines()]
    assert {"train800", "val200", "test"} <= {row[0] for row in rows if row}, shown.output  # each split's row, unbroken
    assert max(map(len, shown.output.splitlines())) <= 80
    listed = CliRunner().invoke(app, ["methods"], env=narrow)
    assert "…" not in listed.output


def test_runs_at_80_columns_gives_each_record_two_lines_instead_of_a_crushed_table(digits_cache, tmp_path):
    trained = CliRunner().invoke(app, ["train", "--cache", str(digits_cache.path), "--method", "linear", "--epochs", "1",
                                       "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "one")])
    assert trained.exit_code == 0, trained.output
    listed = CliRunner().invoke(app, ["runs", str(tmp_path)], env={"COLUMNS": "80"}).output
    assert "one run, linear on digits, top-1" in listed and "train800 -> val200; lr 0.3" in listed, listed
    assert max(map(len, listed.splitlines())) <= 80


def test_every_help_stays_within_80_columns_and_cuts_nothing():
    for command in ([], ["extract"], ["info"], ["train"], ["evaluate"], ["runs"], ["predict"], ["sweep"], ["demo"],
                    ["methods"], ["models"], ["datasets"]):
        shown = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert shown.exit_code == 0, shown.output
        assert max(map(len, shown.output.splitlines())) <= 80, (command, shown.output)
        described = [line for line in shown.output.splitlines() if not line.startswith("Usage:")]  # ARGS... is variadic
        assert not any("…" in line or line.rstrip().endswith("...") for line in described), shown.output


HELP_PATH = """
import sys
from typer.testing import CliRunner
from cli.main import app
for command in ([], ["train"], ["sweep"], ["extract"], ["methods"]):
    assert CliRunner().invoke(app, [*command, "--help"]).exit_code == 0
print(" ".join(sorted(sys.modules)))
"""


def test_the_help_path_imports_no_torch_timm_zarr_or_datasets():
    done = subprocess.run([sys.executable, "-c", HELP_PATH], capture_output=True, text=True,
                          env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    heavy = {"torch", "timm", "zarr", "datasets", "numpy", "sidetune.sidenets"}
    assert "typer" in loaded and "cli.main" in loaded and not loaded & heavy, sorted(loaded & heavy)


def test_the_declarations_file_is_the_registrys():
    from sidetune.declarations import DECLARATIONS_FILE
    from sidetune.sidenets import describe_methods

    assert json.loads(DECLARATIONS_FILE.read_text()) == describe_methods(), (
        "sidetune/declarations.json is stale: run `python -m sidetune.declarations` and commit it")


def test_methods_read_from_the_file_match_those_read_from_the_registry():
    listed_cold = subprocess.run([sys.executable, "-m", "sidetune", "methods", "--json"], capture_output=True, text=True,
                                 env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin"})
    from sidetune.sidenets import describe_methods

    assert json.loads(listed_cold.stdout) == describe_methods()


def test_a_default_grid_sweep_estimated_over_an_hour_says_how_to_make_it_shorter(digits_cache, tmp_path):
    command = [sys.executable, "-m", "sidetune", "sweep", "--cache", str(digits_cache.path), "--method", "last",
               "--epochs", "2000", "--protocol", "none", "--train-split", "train800", "--eval-split", "val200",
               "--device", "cpu"]
    env = {"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "300"}
    sweeping = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path)
    seen = []
    try:
        for line in sweeping.stderr:  # the estimate and its hint print before any training: stop there
            seen.append(line)
            if "That is long" in line or "stack" in line:
                break
    finally:
        sweeping.kill()
        sweeping.wait()
    text = " ".join("".join(seen).split())
    assert "12 configurations of last, the default grid" in text and " h of training" in text
    assert "That is long. To make it shorter: fewer epochs (--epochs 500), successive halving (--halving)" in text
