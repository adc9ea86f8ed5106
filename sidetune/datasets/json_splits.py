"""Datasets in VPT's JSON layout (KMnP/vpt, src/data/datasets/json_dataset.py): a folder holding
`train.json`, `val.json` and `test.json`, each mapping an image path to a class id, the paths
relative to an image folder (CUB and NABirds: `images/`, Stanford Dogs: `Images/`, Oxford
Flowers and Stanford Cars: the folder itself). This is how the PEFT literature distributes the
FGVC benchmark's splits (VPT split train where a dataset has no official validation split).

Class ids are mapped to contiguous labels in sorted order, as VPT's JSONDataset does (over the
ids of all three splits, which is the same where every split has every class). The protocol is
VPT's (`tune_fgvc.py`, `train.py`): every configuration trains on train and is scored on val,
and the selected configuration's top-1 on test is reported, trained on train alone: the final
model's training role is played by `train` (VTAB-1k's retrains on train and val together)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sidetune.datasets.sources import FileSplit, ImageSource
from sidetune.errors import SidetuneError
from sidetune.roles import SplitRoles

JSON_SPLITS = ("train", "val", "test")
IMAGE_DIRS = ("", "images", "Images")  # where VPT's datasets keep the images their paths name


def is_json_folder(folder: Path) -> bool:
    return all((folder / f"{split}.json").is_file() for split in JSON_SPLITS)


def load_json_folder(folder: Path, name: str | None = None, image_dir: str | None = None) -> ImageSource:
    """The splits of a VPT-style folder; `image_dir` (relative to it) where its paths start,
    found from the first image when not given."""
    records = {split: _read_split_file(folder / f"{split}.json") for split in JSON_SPLITS}
    class_ids = sorted({class_id for record in records.values() for class_id in record.values()})
    label_of = {class_id: label for label, class_id in enumerate(class_ids)}
    root = folder / image_dir if image_dir is not None else _image_root(folder, next(iter(records["train"])))
    splits = {}
    for split, record in records.items():
        paths = [root / relative for relative in record]
        missing = next((path for path in paths if not path.is_file()), None)
        if missing is not None:
            raise SidetuneError(f"Image {missing} (listed in {folder / f'{split}.json'}) does not exist. Restore it, "
                                "or point --dataset / --data-root at the folder VPT's split files belong to.")
        splits[split] = FileSplit(paths, np.asarray([label_of[c] for c in record.values()], dtype=np.int64), root)
    return ImageSource(
        name=name or folder.name,
        source=f"json-folder:{folder.resolve()}",
        class_names=_class_names(records["train"], class_ids),
        splits=splits,
        notes=[f"VPT's FGVC protocol: configurations train on train and are selected on val; the selected one, trained "
               f"on train, is reported on test ({len(class_ids)} class ids mapped to labels in sorted order)"],
        roles=SplitRoles(train="train", val="val", trainval="train", test="test"),
    )


def _read_split_file(path: Path) -> dict[str, int]:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SidetuneError(f"Could not read the split file {path}: {error}. It must be a JSON object mapping each "
                            "image path to its class id.") from None
    if not isinstance(record, dict) or not all(isinstance(c, int) and not isinstance(c, bool) for c in record.values()):
        raise SidetuneError(f"The split file {path} must be a JSON object mapping each image path to an integer class "
                            "id, as VPT's train.json, val.json and test.json do.")
    return record


def _image_root(folder: Path, first: str) -> Path:
    for image_dir in IMAGE_DIRS:
        if (folder / image_dir / first).is_file():
            return folder / image_dir
    raise SidetuneError(f"The first image of {folder / 'train.json'}, {first}, is in none of "
                        f"{', '.join(str(folder / d) for d in IMAGE_DIRS)}. Put the images where their paths "
                        "point (VPT: images/ for CUB and NABirds, Images/ for Stanford Dogs, the folder itself "
                        "for Flowers and Cars).")


def _class_names(train: dict[str, int], class_ids: list[int]) -> list[str]:
    """A class's name: the folder its training images share (CUB's 001.Black_footed_Albatross),
    else its id."""
    folders: dict[int, set[str]] = {}
    for path, class_id in train.items():
        parts = Path(path).parts
        folders.setdefault(class_id, set()).add(parts[0] if len(parts) > 1 else "")
    names = [next(iter(folders[c])) if len(folders.get(c, ())) == 1 and "" not in folders[c] else str(c)
             for c in class_ids]
    return names if len(set(names)) == len(names) else [str(c) for c in class_ids]
