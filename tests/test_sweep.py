"""`sidetune sweep`: grids, stacking, the validation protocol, isolation, results files."""

import csv
import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import assert_plot_drawn, config, extract_tiny, write_vtab_folder
from sidetune.errors import Interrupted
from sidetune.sweeps import expand_grid, sweep
from sidetune.training import sidenet_blueprint
from sidetune.training.stacking import plan_stacks, stack_capacity, stack_memory


@pytest.fixture(scope="module")
def small_vtab_cache(tmp_path_factory):
    """digits with all four VTAB-1k splits, 64 images each."""
    out = tmp_path_factory.mktemp("sweep") / "digits"
    extract_tiny("digits", out, limit=64)
    return sidetune.open_cache(out)


def test_a_grid_expands_to_every_combination_with_options_resolved():
    configs = expand_grid("last", {"lr": [1e-3, 3e-3], "rank": [4, 8]}, {"epochs": 3})
    assert [(c.lr, dict(c.options)["rank"]) for c in configs] == [(1e-3, 4), (1e-3, 8), (3e-3, 4), (3e-3, 8)]
    assert all(c.epochs == 3 and dict(c.options)["gap"] == 1 for c in configs)
    with pytest.raises(sidetune.SidetuneError, match="Unknown sweep setting token_rank for method last"):
        expand_grid("last", {"token_rank": [4]})


def test_same_shape_configs_stack_and_stacks_respect_the_maximum():
    configs = expand_grid("last", {"lr": [1e-3, 3e-3, 1e-2], "rank": [4, 8]})
    assert plan_stacks(configs, 2) == [[0, 2], [4], [1, 3], [5]]
    assert plan_stacks(configs, 64) == [[0, 2, 4], [1, 3, 5]]
    rank4, rank8 = configs[0].group_key(), configs[1].group_key()
    assert plan_stacks(configs, {rank4: 1, rank8: 3}) == [[0], [2], [4], [1, 3, 5]]


def memory_per_config(cache, settings, device):
    return stack_memory(cache, sidenet_blueprint(cache, settings.method, dict(settings.options)), settings, "train800",
                        device)[1]


def capacity(cache, settings, device, available):
    blueprint = sidenet_blueprint(cache, settings.method, dict(settings.options))
    return stack_capacity(cache, blueprint, settings, "train800", "val200", device, available=available)


def test_a_configs_memory_is_measured_and_grows_with_its_size(small_vtab_cache, device):
    small, wide, big_batch, probe = (memory_per_config(small_vtab_cache, settings, device) for settings in (
        config("last", rank=4, batch_size=16), config("last", rank=32, batch_size=16),
        config("last", rank=4, batch_size=64), config("linear", batch_size=16)))
    assert probe * 50 < small < wide
    assert 3 * small < big_batch < 5 * small  # activations scale with the batch


def test_stacks_are_cut_to_the_memory_left_after_the_features(small_vtab_cache, device):
    last = config("last", rank=4, batch_size=16)
    per_config = memory_per_config(small_vtab_cache, last, device)
    features = sum(small_vtab_cache.split(s).num_images * small_vtab_cache.split(s).image_nbytes() for s in ("train800", "val200"))
    tight = capacity(small_vtab_cache, last, device, available=features + 10 * per_config)
    assert tight in (3, 4)  # 80% of 10 configs' room, less the shared batch, with 2x headroom
    assert capacity(small_vtab_cache, last, device, available=features) == 1
    assert capacity(small_vtab_cache, last, device, available=2**36) > 1000


def test_a_sweep_cut_into_small_stacks_matches_one_stack(small_vtab_cache, tmp_path):
    configs = expand_grid("last", {"lr": [1e-3, 3e-3, 1e-2]}, {"epochs": 2, "rank": 4})
    stacked = sweep(small_vtab_cache, configs, out=tmp_path / "a", protocol="none", train_split="train800", eval_split="val200")
    one_by_one = sweep(small_vtab_cache, configs, out=tmp_path / "b", protocol="none", train_split="train800",
                       eval_split="val200", max_stack=1)
    assert [r.top1 for r in stacked.rows] == [r.top1 for r in one_by_one.rows]


def test_vtab_protocol_selects_on_val200_and_reports_the_retrained_best_on_test(small_vtab_cache, tmp_path):
    configs = expand_grid("linear", {"lr": [1e-3, 0.3], "seed": [0, 1]}, {"epochs": 3})
    report = sweep(small_vtab_cache, configs, out=tmp_path / "sweep", top_k=2)
    assert report.protocol.name == "val" and not report.protocol.selected_on_test
    selected = [row for row in report.rows if row.phase == "select"]
    assert len(selected) == 4 and {(r.train_split, r.eval_split) for r in selected} == {("train800", "val200")}
    ranked = sorted(selected, key=lambda r: -r.top1)
    final = [row for row in report.rows if row.phase == "final"]
    assert sorted(r.config_id for r in final) == sorted(r.config_id for r in ranked[:2])
    assert {(r.train_split, r.eval_split) for r in final} == {("train800val200", "test")}
    assert report.best.phase == "final" and report.best.top1 == max(r.top1 for r in final)
    with open(tmp_path / "sweep" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {"config_id", "phase", "lr", "seed", "pool", "top1", "seconds", "status"} <= set(rows[0])
    assert len((tmp_path / "sweep" / "results.jsonl").read_text().splitlines()) == 6
    assert_plot_drawn(tmp_path / "sweep" / "sweep.png")


def test_the_best_configs_train_command_reproduces_its_reported_result(small_vtab_cache, tmp_path):
    configs = expand_grid("last", {"lr": [1e-3, 1e-2]}, {"epochs": 2, "rank": 4})
    report = sweep(small_vtab_cache, configs, out=tmp_path / "sweep")
    command = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["train_command"]
    arguments = shlex.split(command)[1:] + ["--out", str(tmp_path / "alone")]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    assert (metrics["train_split"], metrics["eval_split"]) == ("train800val200", "test")
    assert metrics["top1"] == report.best.top1


def test_the_best_configs_train_command_keeps_the_splits_the_sweep_used(small_vtab_cache, tmp_path):
    configs = expand_grid("linear", {"lr": [0.01, 0.1]}, {"epochs": 1})
    report = sweep(small_vtab_cache, configs, out=tmp_path / "sweep", protocol="none", train_split="train800",
                   eval_split="val200")
    command = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["train_command"]
    result = CliRunner().invoke(app, shlex.split(command)[1:] + ["--out", str(tmp_path / "alone")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    assert (metrics["train_split"], metrics["eval_split"]) == ("train800", "val200")
    assert metrics["top1"] == report.best.top1


def test_a_diverging_config_fails_alone_and_the_others_match_a_sweep_without_it(small_vtab_cache, tmp_path):
    healthy = expand_grid("linear", {"lr": [0.01, 0.1]}, {"epochs": 2})
    diverging = expand_grid("linear", {"lr": [1e38]}, {"epochs": 2})
    with_bad = sweep(small_vtab_cache, healthy + diverging, out=tmp_path / "a", protocol="none",
                     train_split="train800", eval_split="val200")
    without = sweep(small_vtab_cache, healthy, out=tmp_path / "b", protocol="none",
                    train_split="train800", eval_split="val200")
    assert [r.status for r in with_bad.rows] == ["ok", "ok", "failed"]
    assert [r.top1 for r in with_bad.rows[:2]] == [r.top1 for r in without.rows]
    assert "loss became" in with_bad.rows[2].failure


def test_sweep_command_reads_a_yaml_grid_and_prints_the_ranked_table(small_vtab_cache, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("method: linear\nepochs: 2\ngrid:\n  lr: [0.01, 0.1]\n  weight_decay: [0.0001, 0.01]\n")
    result = CliRunner().invoke(app, ["sweep", "--cache", str(small_vtab_cache.path), "--grid", str(grid),
                                      "--protocol", "none", "--train-split", "train800", "--eval-split", "val200",
                                      "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert sorted((r["lr"], r["weight_decay"]) for r in records) == [(0.01, 0.0001), (0.01, 0.01), (0.1, 0.0001), (0.1, 0.01)]
    assert "sidetune train --cache" in result.output


class StopAtStack:
    """on_stack that acts like Ctrl-C when stack `number` is about to start."""

    def __init__(self, number: int | None = None):
        self.number, self.started = number, []

    def __call__(self, number, total, configs):
        if number == self.number:
            raise KeyboardInterrupt
        self.started.append([c.lr for c in configs])


def test_an_interrupted_sweep_reruns_only_the_missing_stacks_and_ends_as_an_uninterrupted_one(small_vtab_cache, tmp_path):
    configs = expand_grid("linear", {"lr": [0.01, 0.03, 0.1]}, {"epochs": 2})
    splits = dict(protocol="none", train_split="train800", eval_split="val200", max_stack=1)
    with pytest.raises(Interrupted):
        sweep(small_vtab_cache, configs, out=tmp_path / "resumed", on_stack=StopAtStack(2), **splits)
    assert not (tmp_path / "resumed" / "sweep.json").exists()
    rerun = StopAtStack()
    resumed = sweep(small_vtab_cache, configs, out=tmp_path / "resumed", on_stack=rerun, **splits)
    assert rerun.started == [[0.1]]  # the two finished stacks are not trained again
    straight = sweep(small_vtab_cache, configs, out=tmp_path / "straight", **splits)
    assert [(r.config_id, r.top1) for r in resumed.rows] == [(r.config_id, r.top1) for r in straight.rows]
    assert len((tmp_path / "resumed" / "results.jsonl").read_text().splitlines()) == 3


def test_a_sweep_folder_holding_other_settings_is_refused(small_vtab_cache, tmp_path):
    splits = dict(protocol="none", train_split="train800", eval_split="val200")
    sweep(small_vtab_cache, expand_grid("linear", {"lr": [0.01]}, {"epochs": 1}), out=tmp_path / "s", **splits)
    with pytest.raises(sidetune.SidetuneError, match="holds a sweep with other settings"):
        sweep(small_vtab_cache, expand_grid("linear", {"lr": [0.3]}, {"epochs": 1}), out=tmp_path / "s", **splits)


def test_bare_sweep_trains_the_methods_default_grid_on_the_one_cache_under_cache(tmp_path, monkeypatch):
    extract_tiny("digits", tmp_path / "cache" / "digits", limit=32)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", "--method", "linear", "--epochs", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "9 configurations of linear, the default grid of linear (lr x weight_decay" in result.output
    assert "of training" in result.output  # the time estimate, before training starts
    [folder] = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert sorted({(r["lr"], r["weight_decay"]) for r in rows if r["phase"] == "select"}) == sorted(
        (lr, wd) for lr in (0.03, 0.1, 0.3) for wd in (0.0, 1e-4, 1e-3))


def test_bare_sweep_over_several_caches_summarises_them_as_a_suite(tmp_path, monkeypatch):
    for task in ("dtd", "kitti"):
        extract_tiny(write_vtab_folder(tmp_path / "data" / task), tmp_path / "cache" / task)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", "--method", "linear", "--lr", "0.1", "--wd", "0", "--epochs", "1"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "on 2 caches" in result.output and "mean of 2 tasks" in result.output


def test_bare_sweep_without_caches_says_to_extract_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep"])
    assert isinstance(result.exception, sidetune.SidetuneError)
    assert "run `sidetune extract" in str(result.exception)


def test_runs_lists_every_run_and_sweep_from_their_files(small_vtab_cache, tmp_path):
    sidetune.train(small_vtab_cache, config("linear", epochs=1), out=tmp_path / "runs" / "one", train_split="train800",
                   eval_split="val200")
    sweep(small_vtab_cache, expand_grid("linear", {"lr": [0.01, 0.1]}, {"epochs": 1}), out=tmp_path / "runs" / "grid")
    result = CliRunner().invoke(app, ["runs", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    records = {Path(r["path"]).name: r for r in json.loads(result.output)}
    assert set(records) == {"one", "grid"}
    assert records["one"]["kind"] == "run" and records["one"]["splits"] == "train800 -> val200"
    assert records["one"]["top1"] == json.loads((tmp_path / "runs" / "one" / "metrics.json").read_text())["top1"]
    assert records["grid"]["kind"] == "sweep" and records["grid"]["settings"].startswith("2 configs, val protocol")
    assert records["grid"]["top1"] == json.loads((tmp_path / "runs" / "grid" / "sweep.json").read_text())["best"]["top1"]
    table = CliRunner().invoke(app, ["runs", str(tmp_path / "runs")], terminal_width=250)
    assert "2 under" in table.output and "linear" in table.output


def test_log_tensorboard_writes_each_configs_scalars_and_hparams_entry(small_vtab_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    result = CliRunner().invoke(app, ["sweep", "--cache", str(small_vtab_cache.path), "--method", "linear",
                                      "--lr", "0.01,0.1", "--epochs", "3", "--protocol", "none", "--train-split",
                                      "train800", "--eval-split", "val200", "--log", "tensorboard",
                                      "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    rows = {r["config_id"]: r for r in map(json.loads, (tmp_path / "sweep" / "results.jsonl").read_text().splitlines())}
    for config_id, lr in ((0, 0.01), (1, 0.1)):
        events = EventAccumulator(str(tmp_path / "sweep" / "tensorboard" / f"single-{config_id}"))
        events.Reload()
        assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
        assert [e.step for e in events.Scalars("train_top1")] == [1, 2, 3]
        assert events.Scalars("lr")[-1].value < lr  # the cosine schedule's end, read back
        assert events.Scalars("hparam/top1")[0].value == pytest.approx(rows[config_id]["top1"])
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        start = HParamsPluginData.FromString(content).session_start_info
        assert start.hparams["lr"].number_value == pytest.approx(lr) and start.hparams["method"].string_value == "linear"


def test_successive_halving_reports_pruned_configs_and_ends_survivors_as_full_runs(digits_cache, device):
    from sidetune.sweeps.halving import Halving, train_with_halving
    from sidetune.training import train_group

    configs = [config("linear", epochs=4, lr=lr, seed=s) for s, lr in enumerate((0.01, 0.03, 0.1, 0.3))]
    results = train_with_halving(digits_cache, configs, "train800", "val200", device, Halving(factor=2, min_epochs=1))
    assert [r.config for r in results] == configs
    trained = sorted(len(r.history) for r in results)
    assert trained == [1, 1, 2, 4]  # rungs after epochs 1 and 2: 4 -> 2 -> 1
    assert sorted(r.status for r in results) == ["ok", "pruned", "pruned", "pruned"]
    [survivor] = [r for r in results if r.status == "ok"]
    [alone] = train_group(digits_cache, [survivor.config], "train800", "val200", device)
    assert survivor.epoch_losses == pytest.approx(alone.epoch_losses, rel=1e-4)  # the full-length schedule
    assert abs(survivor.top1 - alone.top1) <= (0.0 if device.type == "cpu" else 1.0)
    first_rung = [r for r in results if len(r.history) == 1]
    assert all(r.top1 is not None and r.state for r in first_rung)  # pruned, with their rung's score and state


def test_sweep_with_halving_marks_pruned_rows_and_selects_among_finished_configs(small_vtab_cache, tmp_path):
    configs = expand_grid("linear", {"lr": [0.01, 0.03, 0.1, 0.3]}, {"epochs": 3})
    from sidetune.sweeps.halving import Halving

    report = sweep(small_vtab_cache, configs, out=tmp_path / "sweep", halving=Halving(factor=2, min_epochs=1))
    select = [row for row in report.rows if row.phase == "select"]
    assert sum(row.status == "pruned" for row in select) == 3 and len(select) == 4
    assert {row.epochs_trained for row in select if row.status == "pruned"} <= {1, 2}
    finished = [row for row in select if row.status == "ok"]
    assert [row.config_id for row in report.rows if row.phase == "final"] == [finished[0].config_id]


@pytest.mark.parametrize("arguments", [["--method", "ridge", "--wd", "0.1,10"], ["--method", "head2toe", "--top-stages", "0,2"],
                                       ["--method", "attentive", "--queries", "1,2", "--lr", "0.01"]])
def test_the_probe_family_sweeps_from_the_command_line(small_vtab_cache, tmp_path, arguments):
    result = CliRunner().invoke(app, ["sweep", "--cache", str(small_vtab_cache.path), *arguments, "--epochs", "2",
                                      "--protocol", "none", "--train-split", "train800", "--eval-split", "val200",
                                      "--out", str(tmp_path / "sweep")], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["status"] == "ok" and row["top1"] > 0 for row in rows)


def test_a_sweep_keeps_its_top_k_models_as_runs_that_evaluate_to_their_reported_top1(small_vtab_cache, tmp_path):
    configs = expand_grid("linear", {"lr": [1e-3, 0.1, 0.3]}, {"epochs": 2})
    report = sweep(small_vtab_cache, configs, out=tmp_path / "sweep", top_k=2)
    final = {row.config_id: row.top1 for row in report.rows if row.phase == "final"}
    assert sorted(report.models) == sorted(final)  # the top-k, each a run directory
    recorded = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["models"]
    assert {int(config_id) for config_id in recorded} == set(final)
    for config_id, path in report.models.items():
        assert sidetune.evaluate(path, "test", device="cpu")["top1"] == final[config_id]


def test_a_single_split_sweep_keeps_the_model_of_its_best(small_vtab_cache, tmp_path):
    configs = expand_grid("linear", {"lr": [1e-3, 0.1]}, {"epochs": 2})
    report = sweep(small_vtab_cache, configs, out=tmp_path / "sweep", protocol="none", train_split="train800",
                   eval_split="val200")
    assert list(report.models) == [report.best.config_id]
    assert sidetune.evaluate(report.models[report.best.config_id], "val200", device="cpu")["top1"] == report.best.top1


def test_a_sweep_over_blocks_and_pooling_loads_each_split_once_and_scores_as_separate_runs(small_vtab_cache, tmp_path,
                                                                                             monkeypatch):
    from sidetune.cache.reader import CachedSplit
    from sidetune.training import train_group

    configs = expand_grid("linear", {"blocks": [1, 4], "pool": ["cls", "both"]}, {"epochs": 2, "lr": 0.1})
    loads = []
    original = CachedSplit.load_stored
    monkeypatch.setattr(CachedSplit, "load_stored", lambda self, stages=None: loads.append(self.name) or original(self, stages))
    report = sweep(small_vtab_cache, configs, out=tmp_path / "sweep", protocol="none", train_split="train800",
                   eval_split="val200")
    assert loads == ["train800val200"]  # the stored split of train800 and val200, once for four groups
    monkeypatch.setattr(CachedSplit, "load_stored", original)
    for row, settings in zip(report.rows, configs):
        [alone] = train_group(small_vtab_cache, [settings], "train800", "val200", "cpu")
        assert row.top1 == alone.top1, dict(settings.options)


def test_the_dinov2_preset_grid_sweeps_its_52_heads_from_the_command_line(small_vtab_cache, tmp_path):
    result = CliRunner().invoke(app, ["sweep", "--cache", str(small_vtab_cache.path), "--grid", "dinov2-linear",
                                      "--epochs", "1", "--protocol", "none", "--train-split", "train800",
                                      "--eval-split", "val200", "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 52 and {(row["blocks"], row["pool"]) for row in rows} == {(1, "cls"), (1, "both"), (4, "cls"),
                                                                                   (4, "both")}
    assert {row["weight_decay"] for row in rows} == {0.0} and len({row["lr"] for row in rows}) == 13
