"""Image sources: every dataset form becomes an `ImageSource` — named splits of images and
integer labels, class names, and a fingerprint that identifies the exact data."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from sidetune.errors import SidetuneError
from sidetune.roles import SplitRoles

if TYPE_CHECKING:
    from sidetune.datasets.video import FrameSampling

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class ImageSplit(Protocol):
    """One split: `labels[i]` belongs to `image(i)`; `describe(i)` names item i in errors;
    `keys()` identifies each image, so that the same image in two splits is stored once."""

    labels: np.ndarray

    def __len__(self) -> int: ...
    def image(self, index: int) -> Image.Image: ...
    def describe(self, index: int) -> str: ...
    def fingerprint(self) -> str: ...
    def keys(self) -> list[str]: ...
    def subset(self, indices: np.ndarray) -> "ImageSplit": ...


@dataclass
class FileSplit:
    """Images stored as files; labels given by a list file or by class folders."""

    paths: list[Path]
    labels: np.ndarray
    root: Path

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist()):
            named = path.relative_to(self.root) if path.is_relative_to(self.root) else path  # a list file's absolute path
            digest.update(f"{named}|{label}|{path.stat().st_size}\n".encode())
        return digest.hexdigest()

    def keys(self) -> list[str]:
        return [f"{path.resolve()}|{label}" for path, label in zip(self.paths, self.labels.tolist())]

    def subset(self, indices: np.ndarray) -> "FileSplit":
        return FileSplit([self.paths[i] for i in indices], self.labels[indices], self.root)


@dataclass
class ArraySplit:
    """Images held in memory as uint8 arrays (N, H, W) or (N, H, W, 3)."""

    images: np.ndarray
    labels: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()

    def keys(self) -> list[str]:
        """The pixels and the label: equal images are interchangeable, wherever they came from."""
        return [hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() + f"|{label}"
                for image, label in zip(self.images, self.labels.tolist())]

    def subset(self, indices: np.ndarray) -> "ArraySplit":
        return ArraySplit(self.images[indices], self.labels[indices], self.name)


@dataclass
class HubSplit:
    """A split of a Hugging Face `datasets.Dataset` with an image column and a label column."""

    dataset: object  # datasets.Dataset
    image_column: str
    label_column: str
    name: str
    rows: np.ndarray | None = None  # row of each item in the dataset it was selected from
    base: str = ""  # that dataset's fingerprint
    labels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.dataset[self.label_column], dtype=np.int64)
        if self.rows is None:
            self.rows, self.base = np.arange(len(self.dataset)), str(self.dataset._fingerprint)

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, index: int) -> Image.Image:
        image = self.dataset[int(index)][self.image_column]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return image.convert("RGB")

    def describe(self, index: int) -> str:
        return f"{self.name} row {index}"

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.dataset._fingerprint}|{len(self)}".encode()).hexdigest()

    def keys(self) -> list[str]:
        return [f"{self.base}|{row}|{label}" for row, label in zip(self.rows.tolist(), self.labels.tolist())]

    def subset(self, indices: np.ndarray) -> "HubSplit":
        return HubSplit(self.dataset.select(indices.tolist()), self.image_column, self.label_column, self.name,
                        self.rows[indices], self.base)


@dataclass
class UnionSplit:
    """Several splits listed one after the other (train then val: trainval), each item read from
    the split it belongs to; `items` holds (part, row) pairs."""

    parts: list[ImageSplit]
    items: np.ndarray = field(default=None)  # (N, 2) int64
    labels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.items is None:
            self.items = np.array([(part, row) for part, split in enumerate(self.parts) for row in range(len(split))],
                                  dtype=np.int64).reshape(-1, 2)
        self.labels = np.asarray([self.parts[part].labels[row] for part, row in self.items.tolist()], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> Image.Image:
        part, row = self.items[index]
        return self.parts[part].image(int(row))

    def describe(self, index: int) -> str:
        part, row = self.items[index]
        return self.parts[part].describe(int(row))

    def fingerprint(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.items).tobytes())
        for part in self.parts:
            digest.update(f"{len(part)}:{part.fingerprint()}\n".encode())
        return digest.hexdigest()

    def keys(self) -> list[str]:
        keys = [part.keys() for part in self.parts]
        return [keys[part][row] for part, row in self.items.tolist()]

    def subset(self, indices: np.ndarray) -> "UnionSplit":
        return UnionSplit(self.parts, self.items[np.asarray(indices, dtype=np.int64)])


@dataclass
class ImageSource:
    """A dataset ready for extraction."""

    name: str
    source: str
    class_names: list[str]
    splits: dict[str, ImageSplit]
    task: str | None = None  # VTAB-1k task name when the data follows that protocol
    group: str | None = None
    notes: list[str] = field(default_factory=list)
    limit: int | None = None
    roles: SplitRoles | None = None  # None: read from the split names
    validation: dict | None = None  # how a carved validation split was drawn (sidetune/datasets/validation.py)
    warnings: list[str] = field(default_factory=list)  # what can be trained on but is likely a mistake (`check_data`)
    sampling: FrameSampling | None = None  # a video dataset's (sidetune/datasets/video.py); None: images

    @property
    def split_roles(self) -> SplitRoles:
        """The roles of the splits present."""
        return (self.roles or SplitRoles.from_names(self.splits)).only(self.splits)

    def fingerprint(self) -> str:
        digest = hashlib.sha256("|".join(self.class_names).encode())
        for name, split in sorted(self.splits.items()):
            digest.update(f"{name}:{len(split)}:{split.fingerprint()}\n".encode())
        return digest.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "vtab_task": self.task,
            "vtab_group": self.group,
            "class_names": self.class_names,
            "num_classes": len(self.class_names),
            "split_sizes": {name: len(split) for name, split in self.splits.items()},
            "limit": self.limit,
            "roles": self.split_roles.record(),
            "validation": self.validation,
            "notes": self.notes,
            "warnings": self.warnings,
            **({"frames": self.sampling.describe()} if self.sampling is not None else {}),
            "fingerprint": self.fingerprint(),
        }

    def select_splits(self, wanted: list[str] | None) -> "ImageSource":
        if not wanted:
            return self
        missing = [name for name in wanted if name not in self.splits]
        if missing:
            raise SidetuneError(
                f"Dataset {self.name} has no split {', '.join(missing)}; it has "
                f"{', '.join(self.splits)}. Pass --splits with some of those."
            )
        return _replace_splits(self, {name: self.splits[name] for name in wanted})

    def first(self, limit: int | None) -> "ImageSource":
        """The first `limit` images of every split (a quick trial run). The split that holds train
        and val together (VTAB-1k's train800val200, listing train800 then val200) keeps the union
        of their first images."""
        if limit is None:
            return self
        splits = {name: split.subset(np.arange(min(limit, len(split)))) for name, split in self.splits.items()}
        roles = self.split_roles
        if roles.trainval and roles.train and roles.val:
            union, train, val = (self.splits[name] for name in (roles.trainval, roles.train, roles.val))
            if union.keys() == train.keys() + val.keys():
                rows = np.concatenate([np.arange(min(limit, len(train))), len(train) + np.arange(min(limit, len(val)))])
                splits[roles.trainval] = union.subset(rows)
        source = _replace_splits(self, splits)
        source.limit = limit
        return source


def _replace_splits(source: ImageSource, splits: dict[str, ImageSplit]) -> ImageSource:
    return replace(source, splits=splits, notes=list(source.notes))


def check_data(source: ImageSource) -> None:
    """Refuse, in one paragraph, data no classifier can be trained or scored on: labels outside
    the classes, an empty split, fewer than two classes, one image listed under two labels. Add
    to `source.warnings` what can be trained on but is likely a mistake: classes without training
    images (an empty class folder, a gap in the labels), a split with fewer images than classes,
    an image listed twice in a split."""
    classes = len(source.class_names)
    if classes < 2:
        raise SidetuneError(f"{source.name} has {classes} class{'' if classes == 1 else 'es'} "
                            f"({', '.join(source.class_names) or 'none'}): a classifier needs at least two. Add the "
                            "other classes' images (a class folder or label each).")
    for name, split in source.splits.items():
        if not len(split):
            raise SidetuneError(f"Split {name} of {source.name} has no images. Fill it, or leave it out with --splits.")
        labels = split.labels
        if labels.min() < 0 or labels.max() >= classes:
            raise SidetuneError(
                f"Split {name} of {source.name} has labels from {labels.min()} to {labels.max()}, outside the "
                f"{classes} classes. Fix the label column or list file; labels are integers 0..classes-1.")
        images: dict[str, int] = {}
        repeated = []
        for index, key in enumerate(split.keys()):
            image = key.rsplit("|", 1)[0]  # a key is the image's identity, then its label
            if image in images:
                if labels[images[image]] != labels[index]:
                    raise SidetuneError(
                        f"Split {name} of {source.name} lists {split.describe(index)} under two labels "
                        f"({source.class_names[labels[images[image]]]} and {source.class_names[labels[index]]}). "
                        "Keep the right one (fix the list file or move the image).")
                repeated.append(split.describe(index))
            images.setdefault(image, index)
        if repeated:
            source.warnings.append(f"split {name} lists {len(repeated)} image{'s' if len(repeated) > 1 else ''} twice "
                                   f"(e.g. {repeated[0]}): each counts twice in training and scoring")
        if len(split) < classes:
            source.warnings.append(f"split {name} has {len(split)} images for {classes} classes: some classes have none "
                                   "there, and its top-1 moves by whole images")
    training = source.split_roles.final_training
    if training is not None:
        counts = np.bincount(source.splits[training].labels, minlength=classes)
        empty = [source.class_names[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            source.warnings.append(f"{len(empty)} of the {classes} classes {'has' if len(empty) == 1 else 'have'} no "
                                   f"training images in {training} "
                                   f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}: an empty class "
                                   "folder, or a gap in the labels); a model can never learn them")
