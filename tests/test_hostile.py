"""Hostile input through the command line, as a user (or a crash, or a full disk) delivers it:
damaged manifests and run files, bad list files and labels, degenerate datasets, absurd
options. Each ends in one paragraph with a non-zero exit status, never a traceback, and loses
nothing that was sound."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sidetune
from conftest import extract_tiny, python_path, write_image


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidetune", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": python_path(), "PATH": "/usr/bin:/bin", "COLUMNS": "300",
                               "HF_HUB_OFFLINE": "1"})


def refused(done: subprocess.CompletedProcess, *phrases: str) -> str:
    """The one-paragraph refusal's text, after checking it is one (exit 2, no traceback) and says `phrases`."""
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output, output
    said = " ".join(output.split())
    for phrase in phrases:
        assert phrase in said, said
    return said


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A digits cache (16 + 16 images, CLS tokens only) and a finished linear run from it."""
    root = tmp_path_factory.mktemp("hostile")
    extract_tiny("digits", root / "cache", spec="cls", limit=16)
    done = cli("train", "--cache", root / "cache", "--method", "linear", "--epochs", "2", "--train-split", "train800",
               "--eval-split", "val200", "--out", root / "run")
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def cache(small, tmp_path):
    shutil.copytree(small / "cache", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture
def run(small, tmp_path):
    shutil.copytree(small / "run", tmp_path / "runs" / "run")
    return tmp_path / "runs" / "run"


def train_args(cache: Path, out: Path, *extra: str) -> list:
    return ["train", "--cache", cache, "--method", "linear", "--epochs", "2", "--train-split", "train800",
            "--eval-split", "val200", "--out", out, *extra]


@pytest.mark.parametrize("damage, phrase", [
    (lambda record: "{ not json", "it is not JSON"),
    (lambda record: json.dumps({k: v for k, v in record.items() if k != "layout"}), "its layout is missing"),
    (lambda record: json.dumps({**record, "format_version": "2"}), "its format_version is '2' (a str), not an integer"),
    (lambda record: json.dumps({**record, "splits": []}), "its splits is a list"),
])
def test_a_damaged_manifest_is_named_by_every_command_that_reads_it(cache, tmp_path, damage, phrase):
    manifest = cache / "sidetune.json"
    manifest.write_text(damage(json.loads(manifest.read_text())))
    for command in (["info", cache], train_args(cache, tmp_path / "out"),
                    ["extract", "--model", "test_vit", "--no-pretrained", "--dataset", "digits", "--spec", "cls",
                     "--limit", "16", "--out", cache, "--workers", "0"]):
        refused(cli(*command), "manifest of cache", "is damaged", phrase, "--overwrite")


def test_a_damaged_manifest_is_rebuilt_by_overwrite(cache):
    (cache / "sidetune.json").write_text("{ not json")
    done = cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", "digits", "--spec", "cls", "--limit", "16",
               "--out", cache, "--workers", "0", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert sidetune.open_cache(cache).split("train800").num_images == 16


def test_a_truncated_checkpoint_is_named_when_the_run_resumes(small, tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    done = cli(*train_args(small / "cache", out))
    assert done.returncode == 0
    config = json.loads((out / "config.json").read_text())
    (out / "metrics.json").unlink()  # as if killed after a checkpoint
    (out / "checkpoint.pt").write_bytes(b"\x80\x02 truncated")
    said = refused(cli(*train_args(small / "cache", out)), "checkpoint", "is damaged", "Delete it")
    assert json.loads((out / "config.json").read_text()) == config and "cannot resume" in said


@pytest.mark.parametrize("name, command, phrase", [
    ("model.safetensors", "evaluate", "model.safetensors is damaged"),
    ("model.safetensors", "predict", "model.safetensors is damaged"),
    ("config.json", "evaluate", "config.json is damaged (not JSON"),
    ("metrics.json", "predict", "metrics.json is damaged (not JSON"),
])
def test_a_damaged_run_file_is_named_with_its_fix(run, tmp_path, name, command, phrase):
    path = run / name
    path.write_bytes(path.read_bytes()[:40])
    image = tmp_path / "photo.png"
    write_image(image, seed=3)
    args = ["evaluate", "--run", run, "--split", "val200"] if command == "evaluate" else ["predict", "--run", run, image]
    refused(cli(*args), phrase, "--overwrite")


def test_runs_lists_the_sound_runs_and_names_a_damaged_one(run, small, tmp_path):
    shutil.copytree(small / "run", tmp_path / "runs" / "broken")
    (tmp_path / "runs" / "broken" / "metrics.json").write_text("{ cut")
    listed = cli("runs", tmp_path / "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    kinds = {Path(record["path"]).name: record for record in json.loads(listed.stdout)}
    assert kinds["run"]["kind"] == "run" and kinds["broken"]["kind"] == "damaged"
    assert "metrics.json is damaged" in kinds["broken"]["settings"]


def test_a_list_file_with_absolute_paths_under_a_relative_dataset_is_read(tmp_path):
    images = tmp_path / "elsewhere"
    lines = []
    for index in range(8):
        write_image(images / f"{index}.png", seed=index)
        lines.append(f"{images / f'{index}.png'} {index % 2}")
    task = tmp_path / "work" / "task"
    task.mkdir(parents=True)
    for split in ("train800", "val200", "test"):
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    done = cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", "task", "--spec", "cls", "--out",
               "cache", "--workers", "0", cwd=tmp_path / "work")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("label", ["²", "1.0", "cat"])
def test_a_label_that_is_not_an_integer_names_its_line(tmp_path, label):
    write_image(tmp_path / "task" / "a.png", seed=1)
    (tmp_path / "task" / "train800.txt").write_text(f"a.png {label}\n")
    refused(cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", tmp_path / "task", "--out",
                tmp_path / "cache"), "Line 1 of", "integer label")


def test_unicode_decimal_digits_are_integers(tmp_path):
    for index, label in enumerate(["٠", "١", "0", "1"]):  # Arabic-Indic zero and one
        write_image(tmp_path / "task" / f"{index}.png", seed=index)
    lines = "".join(f"{index}.png {label}\n" for index, label in enumerate(["٠", "١", "0", "1"]))
    for split in ("train800", "val200", "test"):
        (tmp_path / "task" / f"{split}.txt").write_text(lines)
    from sidetune.datasets import load_source

    assert load_source(str(tmp_path / "task")).splits["test"].labels.tolist() == [0, 1, 0, 1]


def test_one_class_only_is_refused(tmp_path):
    for index in range(4):
        write_image(tmp_path / "one" / "cats" / f"{index}.png", seed=index)
    refused(cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", tmp_path / "one", "--out",
                tmp_path / "cache"), "has 1 class (cats)", "at least two")


def test_an_image_listed_under_two_labels_is_refused(tmp_path):
    write_image(tmp_path / "task" / "a.png", seed=1)
    write_image(tmp_path / "task" / "b.png", seed=2)
    (tmp_path / "task" / "train800.txt").write_text("a.png 0\nb.png 1\na.png 1\n")
    refused(cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", tmp_path / "task", "--out",
                tmp_path / "cache"), "a.png under two labels")


def test_an_empty_class_a_repeated_image_and_a_tiny_split_are_warned_and_recorded(tmp_path):
    for index in range(10):
        write_image(tmp_path / "task" / f"{index}.png", seed=index)
    train = "".join(f"{index}.png {index % 2}\n" for index in range(8)) + "0.png 0\n"  # label 2 never used; 0.png twice
    (tmp_path / "task" / "train800.txt").write_text(train)
    (tmp_path / "task" / "test.txt").write_text("8.png 2\n9.png 0\n")
    done = cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", tmp_path / "task", "--spec", "cls",
               "--out", tmp_path / "cache", "--workers", "0")
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stderr.split())
    assert "lists 1 image twice" in said and "1 of the 3 classes has no training images" in said
    assert "split test has 2 images for 3 classes" in said
    recorded = " ".join(sidetune.open_cache(tmp_path / "cache").manifest["dataset"]["warnings"])
    assert "twice" in recorded and "no training images" in recorded and "2 images for 3 classes" in recorded


@pytest.mark.parametrize("command", [
    ["train", "--lr", "nan"], ["train", "--wd", "inf"], ["sweep", "--lr", "nan,1e-3"], ["sweep", "--wd", "1e-4,inf"],
])
def test_non_finite_numbers_are_refused_everywhere(small, tmp_path, command):
    refused(cli(*command, "--cache", small / "cache", "--method", "linear", "--epochs", "1", "--out", tmp_path / "o"),
            command[1])
    assert not (tmp_path / "o").exists()


def test_a_rank_beyond_the_width_is_refused(small, tmp_path):
    refused(cli("train", "--cache", small / "cache", "--method", "last", "--rank", "1000", "--out", tmp_path / "o"),
            "--rank 1000 is wider than the backbone's tokens (64)")


def test_a_batch_size_beyond_the_split_trains_on_the_whole_split_with_a_warning(small, tmp_path):
    done = cli(*train_args(small / "cache", tmp_path / "o", "--batch-size", "100000000"))
    assert done.returncode == 0, done.stderr
    assert "larger than the training split train800 (16 images)" in " ".join(done.stderr.split())


def test_a_spec_path_that_does_not_exist_says_so(tmp_path):
    refused(cli("extract", "--model", "test_vit", "--no-pretrained", "--dataset", "digits", "--spec",
                tmp_path / "mine.yaml", "--out", tmp_path / "cache"), "mine.yaml does not exist")


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"This test needs a small real filesystem, but mounting a tmpfs failed ({done.stderr.strip()}); "
                    "run the tests as root, as CI does.")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_disk_that_fills_during_training_says_what_was_kept_and_the_run_resumes(small, small_disk, tmp_path):
    from sidetune.training import TrainConfig

    settings = TrainConfig.create("linear", epochs=4, warmup_epochs=1)
    splits = dict(train_split="train800", eval_split="val200", checkpoint_seconds=0)
    _, straight = sidetune.train(small / "cache", settings, out=tmp_path / "straight", **splits)

    def fill_after_two(stats) -> None:
        if stats.epoch == 2:
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            (small_disk / "other-process.bin").write_bytes(b"\0" * max(free - 1024, 0))

    with pytest.raises(sidetune.SidetuneError, match="is full. The checkpoint of the last finished epoch is kept"):
        sidetune.train(small / "cache", settings, out=small_disk / "run", on_epoch=fill_after_two, **splits)
    assert not [path for path in (small_disk / "run").iterdir() if path.name.endswith(".tmp")]
    (small_disk / "other-process.bin").unlink()
    _, resumed = sidetune.train(small / "cache", settings, out=small_disk / "run", **splits)
    assert resumed.top1 == straight.top1


def test_a_disk_that_fills_during_a_sweep_keeps_its_journal_and_the_sweep_resumes(small, small_disk, tmp_path):
    from sidetune.sweeps import expand_grid, sweep

    configs = expand_grid("linear", {"lr": [0.03, 0.3]}, {"epochs": 2, "warmup_epochs": 1})
    splits = dict(protocol="none", train_split="train800", eval_split="val200", max_stack=1)
    straight = sweep(small / "cache", configs, out=tmp_path / "straight", **splits)
    stacks = []

    def fill_in_the_second_stack(number, total, stack) -> None:
        stacks.append(number)
        if number == 1:
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            (small_disk / "other-process.bin").write_bytes(b"\0" * max(free - 1024, 0))

    with pytest.raises(sidetune.SidetuneError, match="is full. Every finished stack's results are journaled"):
        sweep(small / "cache", configs, out=small_disk / "sweep", on_stack=fill_in_the_second_stack, **splits)
    (small_disk / "other-process.bin").unlink()
    resumed = sweep(small / "cache", configs, out=small_disk / "sweep", **splits)
    assert [row.top1 for row in resumed.rows] == [row.top1 for row in straight.rows]
    assert not list(small_disk.rglob("*.tmp"))
