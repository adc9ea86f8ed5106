"""Split roles and a validation split for every dataset: carved where a dataset has none,
stored as views, recorded and shown; the selection protocol run by roles on any cache, and
selection on test only when asked for, and said."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import extract_tiny, write_image
from sidetune.datasets import load_source
from sidetune.datasets.validation import stratified_split
from sidetune.roles import SplitRoles
from sidetune.sweeps import expand_grid, sweep


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """4 classes x 10 images in class sub-folders, no split folders."""
    root = tmp_path_factory.mktemp("data") / "flowers"
    for label, name in enumerate(["daisy", "iris", "rose", "tulip"]):
        for i in range(10):
            write_image(root / name / f"{i}.png", seed=100 * label + i)
    return root


@pytest.fixture(scope="module")
def flowers_cache(flowers, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "flowers"
    extract_tiny(flowers, out, spec="cls")
    return sidetune.open_cache(out)


def test_a_stratified_split_holds_out_the_fraction_of_each_class_and_is_seeded():
    labels = np.repeat([0, 1, 2], [10, 20, 5])
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[held]).tolist() == [2, 4, 1]
    assert sorted([*kept, *held]) == list(range(len(labels)))
    assert np.array_equal(held, stratified_split(labels, 0.2, seed=0)[1])
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=1)[1])


def test_a_dataset_without_validation_gets_one_carved_from_train_and_recorded(flowers):
    source = load_source(str(flowers))
    assert list(source.splits) == ["train", "val", "trainval", "test"]
    train, val, trainval = (source.splits[name] for name in ("train", "val", "trainval"))
    assert set(train.keys()).isdisjoint(val.keys()) and sorted(trainval.keys()) == sorted(train.keys() + val.keys())
    assert np.bincount(val.labels).tolist() == [2, 2, 2, 2]  # 20% of the 8 training images of each class
    record = source.describe()
    assert record["roles"] == {"train": "train", "val": "val", "trainval": "trainval", "test": "test"}
    assert record["validation"] == {"carved_from": "train", "fraction": 0.2, "seed": 0, "stratified": True, "images": 8}
    assert any("val (8 images" in note for note in source.notes)


def test_a_dataset_with_train_and_validation_gets_their_union_for_the_final_model(tmp_path):
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        for i in range(count):
            write_image(tmp_path / "pets" / split / f"class{i % 2}" / f"{i}.png", seed=10 * len(split) + i)
    source = load_source(str(tmp_path / "pets"))
    assert source.split_roles == SplitRoles("train", "val", "trainval", "test")
    assert source.splits["trainval"].keys() == source.splits["train"].keys() + source.splits["val"].keys()
    assert source.validation is None


def test_vtab_splits_keep_their_names_as_roles(tmp_path):
    source = load_source("digits")
    assert source.split_roles == SplitRoles("train800", "val200", "train800val200", "test")
    assert list(source.splits) == ["train800", "val200", "train800val200", "test"]


def test_the_carved_cache_stores_each_image_once_and_records_its_roles(flowers_cache):
    splits = flowers_cache.splits
    assert splits["trainval"].kind == "stored" and splits["test"].kind == "stored"
    assert (splits["train"].kind, splits["train"].parent.name) == ("view", "trainval")
    assert (splits["val"].kind, splits["val"].parent.name) == ("view", "trainval")
    assert flowers_cache.shared_images("train", "val") == 0
    assert flowers_cache.shared_images("trainval", "val") == 8
    assert flowers_cache.info.roles == SplitRoles("train", "val", "trainval", "test")
    assert flowers_cache.info.carved_validation["carved_from"] == "train"


def test_dry_run_and_info_say_where_the_validation_split_came_from(flowers, flowers_cache, tmp_path):
    planned = CliRunner().invoke(app, ["extract", "--model", "test_vit", "--dataset", str(flowers), "--out",
                                       str(tmp_path / "plan"), "--dry-run"], env={"COLUMNS": "200"})
    assert planned.exit_code == 0, planned.output
    assert "val (8 images, 20% of each class, seed 0) carved from train" in planned.output
    assert "rows of trainval" in planned.output
    shown = CliRunner().invoke(app, ["info", str(flowers_cache.path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "train train, val val, trainval trainval, test test (val carved from train)" in shown.output


def test_a_class_folder_sweep_selects_on_the_carved_validation_split_and_reports_test(flowers_cache, tmp_path):
    configs = expand_grid("linear", {"lr": [0.01, 0.3]}, {"epochs": 2})
    report = sweep(flowers_cache, configs, out=tmp_path / "sweep")
    assert report.protocol.name == "val" and not report.protocol.selected_on_test
    phases = {(row.phase, row.train_split, row.eval_split) for row in report.rows}
    assert phases == {("select", "train", "val"), ("final", "trainval", "test")}
    assert report.best.phase == "final" and report.eval_images_seen_in_training == 0
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert (record["protocol"], record["selected_on"], record["selected_on_test"]) == ("val", "val", False)


def test_the_old_name_of_the_validation_protocol_still_works(flowers_cache, tmp_path):
    report = sweep(flowers_cache, expand_grid("linear", {"lr": [0.1]}, {"epochs": 1}), out=tmp_path / "s", protocol="vtab")
    assert report.protocol.name == "val" and report.protocol.select == "val"


def test_a_cache_without_validation_is_refused_rather_than_selected_on_test(flowers, tmp_path):
    extract_tiny(flowers, tmp_path / "cache", spec="cls", splits=["train", "test"])
    configs = expand_grid("linear", {"lr": [0.01, 0.3]}, {"epochs": 1})
    with pytest.raises(sidetune.SidetuneError, match="no validation split to select on.*--protocol none"):
        sweep(tmp_path / "cache", configs, out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_selecting_on_test_when_asked_is_said_in_the_results_and_the_table(flowers, tmp_path):
    extract_tiny(flowers, tmp_path / "cache", spec="cls", splits=["train", "test"])
    result = CliRunner().invoke(app, ["sweep", "--cache", str(tmp_path / "cache"), "--method", "linear", "--lr",
                                      "0.01,0.3", "--epochs", "1", "--protocol", "none", "--out", str(tmp_path / "s")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the table's title wraps to the table's width
    assert "SELECTED ON TEST" in said and "selected on the test split" in said
    record = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert record["selected_on_test"] is True and record["selected_on"] == "test"
    listed = CliRunner().invoke(app, ["runs", str(tmp_path)], env={"COLUMNS": "200"})
    assert "SELECTED ON TEST" in listed.output


def test_the_validation_protocol_refuses_split_flags_it_would_ignore(flowers_cache, tmp_path):
    with pytest.raises(sidetune.SidetuneError, match="--train-split and --eval-split choose the splits of --protocol none"):
        sweep(flowers_cache, expand_grid("linear", {"lr": [0.1]}, {"epochs": 1}), out=tmp_path / "s", protocol="val",
              train_split="train")
