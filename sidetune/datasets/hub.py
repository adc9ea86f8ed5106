"""Hugging Face `datasets`: `save_to_disk` folders, `hf:org/name` ids, and hub copies of
VTAB-1k tasks for users without a local VTAB-1k folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sidetune.datasets.catalogue import VtabTask
from sidetune.datasets.sources import HubSplit, ImageSource
from sidetune.errors import SidetuneError

HUB_SUBSET_SEED = 0


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def load_saved_dataset(folder: Path) -> ImageSource:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    return _source_from_hub_object(loaded, folder.name, f"hf-disk:{folder.resolve()}")


def load_hub_dataset(hub_id: str, name: str | None = None) -> ImageSource:
    import datasets

    try:
        loaded = datasets.load_dataset(hub_id)
    except Exception as error:
        raise SidetuneError(
            f"Could not load the Hugging Face dataset {hub_id} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}). Without hub access, "
            "pass a local copy: a folder written by datasets' save_to_disk, a class-folder of images, "
            "or a VTAB-1k folder (--data-root or SIDETUNE_DATA)."
        ) from error
    return _source_from_hub_object(loaded, name or hub_id.split("/")[-1], f"hf:{hub_id}")


def load_vtab_from_hub(task: VtabTask) -> ImageSource:
    """A VTAB-1k-shaped subset of a hub copy: 1000 seeded training images (800 + 200) and the
    hub's test split. Not the tfds-order subset of the official protocol."""
    source = load_hub_dataset(task.hub_id, task.name)
    pool = source.splits.get("train")
    test = source.splits.get("test") or source.splits.get("validation")
    if pool is None or test is None or len(pool) < 1000:
        raise SidetuneError(
            f"The hub copy {task.hub_id} of {task.name} lacks a train split of 1000+ images and a "
            "test split, so no VTAB-1k subset can be drawn. Use a local VTAB-1k folder."
        )
    chosen = np.random.default_rng(HUB_SUBSET_SEED).permutation(len(pool))[:1000]
    source.splits = {
        "train800": pool.subset(chosen[:800]),
        "val200": pool.subset(chosen[800:]),
        "train800val200": pool.subset(chosen),
        "test": test,
    }
    if len(source.class_names) != task.num_classes:
        raise SidetuneError(
            f"The hub copy {task.hub_id} has {len(source.class_names)} classes, VTAB-1k {task.name} "
            f"has {task.num_classes}. Use a local VTAB-1k folder."
        )
    source.task, source.group = task.name, task.group
    source.notes.append(
        f"hub copy {task.hub_id}: train800/val200 drawn with seed {HUB_SUBSET_SEED} from its train "
        "split; this is not the tfds-order subset of the official VTAB-1k protocol"
    )
    return source


def _source_from_hub_object(loaded, name: str, source: str) -> ImageSource:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    first = next(iter(loaded.values()))
    image_column = _column_of(first.features, datasets.Image, name, "an Image")
    label_column = _column_of(first.features, datasets.ClassLabel, name, "a ClassLabel")
    class_names = list(first.features[label_column].names)
    splits = {
        split: HubSplit(data, image_column, label_column, f"{name}/{split}")
        for split, data in loaded.items()
    }
    return ImageSource(name, source, class_names, splits)


def _column_of(features, kind, name: str, what: str) -> str:
    for column, feature in features.items():
        if isinstance(feature, kind):
            return column
    raise SidetuneError(
        f"Dataset {name} has no column of type {what} (columns: {', '.join(features)}). sidetune "
        "needs one image column and one ClassLabel column; cast the label column with "
        "`dataset.cast_column(name, ClassLabel(names=...))` and save it again."
    )
