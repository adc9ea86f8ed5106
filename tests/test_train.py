"""`sidetune train`: run directories, split defaults, resume, best state, and no timm."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import sidetune
from conftest import assert_plot_drawn, config, extract_tiny, python_path, sidetune_cli
from sidetune.errors import Interrupted
from sidetune.runs import open_run
from sidetune.train import default_splits, train
from sidetune.training import TrainConfig, restore_sidenet


def interrupt_after(epoch: int):
    """An on_epoch callback that interrupts training, as Ctrl-C would, once `epoch` is done."""
    def on_epoch(stats) -> None:
        if stats.epoch == epoch:
            raise KeyboardInterrupt

    return on_epoch

def test_train_command_writes_a_run_where_timm_cannot_be_imported(digits_cache, tmp_path):
    run_dir = tmp_path / "run"
    script = (
        "import sys; sys.modules['timm'] = None\n"  # any `import timm` now raises ImportError
        "from cli.main import main\n"
        f"sys.argv = ['sidetune', 'train', '--cache', {str(digits_cache.path)!r}, '--method', 'linear', "
        f"'--epochs', '3', '--train-split', 'train800', '--eval-split', 'val200', '--out', {str(run_dir)!r}]\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": python_path(), "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "metrics.json", "model.safetensors", "log.jsonl", "curve.png"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("method", "top1", "eval_split", "train_split", "epochs", "params", "seconds", "seed",
                "lr", "weight_decay", "warmup_epochs", "batch_size", "label_smoothing", "pool", "standardize"):
        assert key in metrics, key
    assert metrics["method"] == "linear" and metrics["epochs"] == 3 and metrics["params"] == 64 * 10 + 10
    assert metrics["top1"] > 30.0  # chance is 10%
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2, 3] and log[-1]["loss"] < log[0]["loss"]
    assert_plot_drawn(run_dir / "curve.png")
    assert f"{metrics['top1']:.2f}" in done.stderr  # the results table


def test_splits_default_to_train_and_validation_then_test_by_role_and_a_missing_one_lists_those_present(
        tmp_path, vtab_folder, class_folder):
    extract_tiny(vtab_folder, tmp_path / "vtab")
    extract_tiny(class_folder, tmp_path / "folders")
    extract_tiny(class_folder, tmp_path / "no-test", splits=["train", "val"])
    vtab, folders, no_test = (sidetune.open_cache(tmp_path / name) for name in ("vtab", "folders", "no-test"))
    assert default_splits(vtab) == ("train800val200", "test")
    assert default_splits(vtab, "train800", "val200") == ("train800", "val200")
    assert default_splits(folders) == ("trainval", "test")
    assert default_splits(no_test) == ("train", "val")
    with pytest.raises(sidetune.SidetuneError, match="no evaluation split 'val200'; it has train, val, trainval, test"):
        default_splits(folders, eval_split="val200")


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(digits_cache, tmp_path):
    settings = config("last", epochs=4, rank=4)
    _, uninterrupted = train(digits_cache, settings, out=tmp_path / "whole", train_split="train800", eval_split="val200")

    with pytest.raises(Interrupted):
        train(digits_cache, settings, out=tmp_path / "cut", train_split="train800", eval_split="val200",
              on_epoch=interrupt_after(2), checkpoint_seconds=0)
    with pytest.raises(sidetune.SidetuneError, match="did not finish"):
        open_run(tmp_path / "cut")
    epochs_seen = []
    _, resumed = train(digits_cache, settings, out=tmp_path / "cut", train_split="train800", eval_split="val200",
                       on_epoch=lambda stats: epochs_seen.append(stats.epoch))
    assert epochs_seen == [3, 4]
    for name, value in uninterrupted.state.items():
        assert torch.equal(resumed.state[name], value), name
    assert resumed.top1 == uninterrupted.top1
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2, 3, 4]
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


def test_a_finished_run_is_refused_unless_overwritten(digits_cache, tmp_path):
    settings = config("linear", epochs=1)
    train(digits_cache, settings, out=tmp_path / "run", train_split="train800", eval_split="val200")
    with pytest.raises(sidetune.SidetuneError, match="already holds a finished run.*--overwrite"):
        train(digits_cache, settings, out=tmp_path / "run", train_split="train800", eval_split="val200")
    train(digits_cache, settings, out=tmp_path / "run", train_split="train800", eval_split="val200", overwrite=True)


def test_overwriting_a_run_keeps_it_whole_until_the_new_one_has_finished(digits_cache, tmp_path):
    splits = dict(train_split="train800", eval_split="val200")
    train(digits_cache, config("linear", epochs=1), out=tmp_path / "run", **splits)
    before = (tmp_path / "run" / "metrics.json").read_text()
    with pytest.raises(Interrupted, match="stays as it was until the new one is finished"):
        train(digits_cache, config("linear", epochs=3), out=tmp_path / "run", overwrite=True, on_epoch=interrupt_after(2),
              checkpoint_seconds=0, **splits)
    assert (tmp_path / "run" / "metrics.json").read_text() == before  # the old run, untouched
    resumed = []
    train(digits_cache, config("linear", epochs=3), out=tmp_path / "run", overwrite=True,
          on_epoch=lambda stats: resumed.append(stats.epoch), **splits)
    assert resumed == [3]  # the replacement resumed where it was cut
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_a_second_writer_of_a_run_folder_is_refused_and_a_stale_lock_is_taken_over(digits_cache, tmp_path):
    from sidetune.runs import LOCK_FILE, writing

    splits = dict(train_split="train800", eval_split="val200")
    with writing(tmp_path / "run", "sidetune train"):  # a train still writing it
        with pytest.raises(sidetune.SidetuneError, match="is being written by sidetune train.*Two writers"):
            train(digits_cache, config("linear", epochs=1), out=tmp_path / "run", **splits)
    (tmp_path / "run" / LOCK_FILE).write_text("sidetune train (pid 1 on a machine that crashed)")  # held by nobody
    train(digits_cache, config("linear", epochs=1), out=tmp_path / "run", **splits)
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_second_sweep_into_the_same_folder_is_refused(digits_cache, tmp_path):
    from sidetune.runs import writing
    from sidetune.sweeps import expand_grid, sweep

    configs = expand_grid("linear", {"lr": [0.1]}, {"epochs": 1})
    with writing(tmp_path / "sweep", "sidetune sweep"):
        with pytest.raises(sidetune.SidetuneError, match="is being written by sidetune sweep"):
            sweep(digits_cache, configs, out=tmp_path / "sweep", protocol="none", train_split="train800",
                  eval_split="val200")


def test_the_best_state_is_the_best_evaluated_epoch(digits_cache, tmp_path):
    run_dir, result = train(digits_cache, config("linear", epochs=6, lr=1.0), out=tmp_path / "run",
                            train_split="train800", eval_split="val200", eval_every=2)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    evaluated = {row["epoch"]: row["eval_top1"] for row in log if "eval_top1" in row}
    assert sorted(evaluated) == [2, 4, 6]
    run = open_run(run_dir)
    assert run.metrics["best_top1"] == max(evaluated.values())
    assert evaluated[run.metrics["best_epoch"]] == run.metrics["best_top1"]
    net = restore_sidenet(run.cache_info, TrainConfig.from_record(run.config["config"]), run.state("best"))
    cached = digits_cache.split("val200")
    with torch.no_grad():
        predictions = net(torch.from_numpy(cached.load([6])).float())[0].argmax(-1)
    top1 = float((predictions == torch.from_numpy(cached.labels)).float().mean() * 100)
    assert top1 == pytest.approx(run.metrics["best_top1"])


def test_an_option_the_method_lacks_is_refused_with_its_options():
    with pytest.raises(sidetune.SidetuneError, match="linear has no option rank; its options are pool"):
        TrainConfig.create("linear", {"rank": 8})


def test_a_run_logged_to_tensorboard_holds_its_epochs_and_final_top1(digits_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, result = train(digits_cache, config("linear", epochs=2), out=tmp_path / "run", train_split="train800",
                            eval_split="val200", tensorboard=True)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [round(e.value, 4) for e in events.Scalars("loss")] == [round(row["loss"], 4) for row in result.history]
    assert events.Scalars("hparam/top1")[0].value == pytest.approx(result.top1)


def test_a_run_interrupted_before_the_augmentation_settings_existed_still_resumes(digits_cache, tmp_path):
    from sidetune.runs import CHECKPOINT_FILE, CONFIG_FILE, load_checkpoint, save_checkpoint

    settings = config("linear", epochs=3)

    def older(record):
        return {k: v for k, v in record.items() if not k.startswith("augment")}

    with pytest.raises(Interrupted):
        train(digits_cache, settings, out=tmp_path / "run", train_split="train800", eval_split="val200",
              on_epoch=interrupt_after(1), checkpoint_seconds=0)
    record = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    (tmp_path / "run" / CONFIG_FILE).write_text(json.dumps({**record, "config": older(record["config"])}))
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
    state["fingerprint"] = [older(f) for f in state["fingerprint"]]
    save_checkpoint(tmp_path / "run" / CHECKPOINT_FILE, state)
    epochs_seen = []
    train(digits_cache, settings, out=tmp_path / "run", train_split="train800", eval_split="val200",
          on_epoch=lambda stats: epochs_seen.append(stats.epoch))
    assert epochs_seen == [2, 3]


def test_a_checkpoint_is_plain_data_and_an_older_pickled_one_still_resumes(digits_cache, tmp_path, monkeypatch):
    import types

    from sidetune.runs import CHECKPOINT_FILE
    from sidetune.training import EpochStats, GroupState

    settings = config("last", epochs=3, rank=4)

    with pytest.raises(Interrupted):
        train(digits_cache, settings, out=tmp_path / "run", train_split="train800", eval_split="val200",
              on_epoch=interrupt_after(1), checkpoint_seconds=0)
    checkpoint = tmp_path / "run" / CHECKPOINT_FILE
    record = torch.load(checkpoint, weights_only=True)  # no class of ours needed to read it
    assert record["epoch"] == 1 and len(record["history"]) == 1
    assert set(record["parameters"]) == set(record["moments"])
    # as checkpoints were written before: a pickled GroupState, its classes in sidetune.engine
    engine = types.ModuleType("sidetune.engine")
    for cls in (GroupState, EpochStats):
        setattr(engine, cls.__name__, cls)
        monkeypatch.setattr(cls, "__module__", "sidetune.engine")
    with monkeypatch.context() as old_layout:
        old_layout.setitem(sys.modules, "sidetune.engine", engine)
        torch.save(GroupState.from_record(record), checkpoint)
    archive = zipfile.ZipFile(checkpoint)
    assert any(b"sidetune.engine" in archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    monkeypatch.undo()
    epochs_seen = []
    train(digits_cache, settings, out=tmp_path / "run", train_split="train800", eval_split="val200",
          on_epoch=lambda stats: epochs_seen.append(stats.epoch))
    assert epochs_seen == [2, 3]


def test_ctrl_c_on_the_command_line_says_what_was_kept_and_loses_at_most_an_epoch(digits_cache, tmp_path):
    import signal
    import time

    from sidetune.runs import CHECKPOINT_FILE, load_checkpoint

    command = [sys.executable, "-m", "sidetune", "train", "--cache", str(digits_cache.path), "--method", "linear",
               "--epochs", "500", "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "run")]
    env = {"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "300"}
    running = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log, deadline = tmp_path / "run" / "log.jsonl", time.monotonic() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == 130, stderr
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)["epoch"]
    assert saved >= len(log.read_text().splitlines()) - 1 >= 2  # at most the epoch in progress is lost
    assert f"epochs 1-{saved} of 500 are kept" in " ".join(stderr.split())
    assert f"resume from epoch {saved + 1}" in " ".join(stderr.split())


def test_a_closed_form_run_says_it_has_no_epochs_and_plots_top1_against_its_penalty(digits_cache, tmp_path):
    done = sidetune_cli("train", "--cache", str(digits_cache.path), "--method", "ridge", "--epochs", "5",
                        "--train-split", "train800", "--eval-split", "val200", "--out", str(tmp_path / "runs" / "ridge"))
    assert done.returncode == 0, done.stderr
    assert "solved in closed form" in " ".join(done.stderr.split()) and "epoch 0/" not in done.stderr
    run = tmp_path / "runs" / "ridge"
    assert (run / "log.jsonl").read_text() == ""
    assert_plot_drawn(run / "curve.png")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["closed_form"] and metrics["epochs"] is None and metrics["top1"] > 30.0
    path = {point["weight_decay"]: point["top1"] for point in metrics["penalty_path"]}
    assert len(path) == 16 and path[1024.0] == metrics["top1"]  # the default grid's 16 strengths, the default λ among them
    assert len(set(path.values())) > 1  # the strengths differ in what they score
    listed = sidetune_cli("runs", str(tmp_path / "runs"), "--json")
    assert json.loads(listed.stdout)[0]["settings"] == "closed form, wd 1024"
