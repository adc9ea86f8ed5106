"""FGVC as the PEFT literature reads it: VPT's train.json / val.json / test.json split files,
class ids mapped to contiguous labels in sorted order, each task's image root, and VPT's
protocol (select on val, report the selected configuration trained on train)."""

import json

import pytest
from typer.testing import CliRunner

import sidetune
from cli.main import app
from conftest import extract_tiny, write_image
from sidetune.roles import SplitRoles
from sidetune.sweeps import expand_grid, sweep

CLASS_IDS = (3, 11, 40)  # not contiguous, as VPT's ids are not always


def write_vpt_folder(folder, image_dir: str, per_class: dict[str, int]) -> None:
    """VPT's layout: images under `image_dir` (in one sub-folder per class), and a JSON map of
    image path to class id per split."""
    for split, count in per_class.items():
        record = {}
        for class_id in CLASS_IDS:
            for index in range(count):
                relative = f"{class_id:03d}.species_{class_id}/{split}_{index}.jpg"
                write_image(folder / image_dir / relative, seed=class_id * 100 + index + len(split) * 1000)
                record[relative] = class_id
        (folder / f"{split}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fgvc")
    write_vpt_folder(root / "CUB_200_2011", "images", {"train": 6, "val": 2, "test": 2})
    return root


def test_an_fgvc_task_by_name_is_read_from_its_vpt_folder_with_contiguous_labels(data_root):
    from sidetune.datasets import load_source

    source = load_source("cub", data_root=data_root)
    assert list(source.splits) == ["train", "val", "test"]  # no trainval: VPT's final model trains on train
    assert source.class_names == ["003.species_3", "011.species_11", "040.species_40"]
    assert sorted(set(source.splits["test"].labels.tolist())) == [0, 1, 2]
    assert source.split_roles == SplitRoles(train="train", val="val", trainval="train", test="test")


def test_any_folder_of_vpt_split_files_is_a_dataset_with_its_image_root_found(tmp_path):
    from sidetune.datasets import load_source

    write_vpt_folder(tmp_path / "dogs", "Images", {"train": 2, "val": 1, "test": 1})
    source = load_source(str(tmp_path / "dogs"))
    assert source.splits["train"].paths[0].parent.parent == tmp_path / "dogs" / "Images"
    assert len(source.splits["val"]) == 3


def test_vpts_protocol_selects_on_val_and_reports_the_selected_config_trained_on_train(data_root, tmp_path):
    extract_tiny("cub", tmp_path / "cache", data_root=data_root, spec="cls")
    cache = sidetune.open_cache(tmp_path / "cache")
    assert cache.info.roles.trainval == "train" and cache.info.task_name == "cub"
    configs = expand_grid("linear", {"lr": [0.01, 0.3]}, {"epochs": 3})
    report = sweep(cache, configs, out=tmp_path / "sweep")
    phases = {(row.phase, row.train_split, row.eval_split) for row in report.rows}
    assert phases == {("select", "train", "val"), ("final", "train", "test")}
    assert "the best retrained on train and reported on test" in report.protocol.describe()


def test_a_missing_fgvc_folder_says_where_it_looked_and_what_to_download(tmp_path):
    with pytest.raises(sidetune.SidetuneError, match="No stanford_dogs folder in VPT's layout.*Stanford-dogs.*train.json"):
        extract_tiny("stanford_dogs", tmp_path / "cache", data_root=tmp_path)


def test_datasets_lists_the_fgvc_tasks():
    listed = CliRunner().invoke(app, ["datasets"], env={"COLUMNS": "200"}).output
    assert all(name in listed for name in ("cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars"))
