"""Local folders: VTAB-1k list-file folders and class-per-subfolder image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sidetune.datasets.catalogue import VTAB_SPLITS, VTAB_TASKS
from sidetune.datasets.sources import IMAGE_SUFFIXES, FileSplit, ImageSource
from sidetune.datasets.validation import stratified_split
from sidetune.datasets.video import ClipSplit, FrameSampling, is_clip
from sidetune.errors import SidetuneError

FOLDER_SPLIT_NAMES = ("train", "val", "valid", "validation", "test", *VTAB_SPLITS)
HOLDOUT_SEED = 0
HOLDOUT_FRACTION = 0.2


def is_list_folder(folder: Path) -> bool:
    return any((folder / f"{split}.txt").is_file() for split in VTAB_SPLITS)


def load_list_folder(folder: Path, name: str | None = None, sampling: FrameSampling | None = None) -> ImageSource:
    """A VTAB-1k style folder: images plus `<split>.txt` files of `relative/path label` lines;
    a video dataset when the paths are clips (video files or frame folders), read by `sampling`."""
    name = name or folder.name
    splits: dict[str, FileSplit | ClipSplit] = {}
    for split in VTAB_SPLITS:
        list_file = folder / f"{split}.txt"
        if list_file.is_file():
            splits[split] = _read_list_file(list_file, folder, sampling)
    task = VTAB_TASKS.get(name)
    if task is not None:
        class_names = task.names()
    else:
        top = max((int(s.labels.max()) for s in splits.values() if len(s)), default=-1)
        class_names = [str(i) for i in range(top + 1)]
    return ImageSource(
        name=name,
        source=f"vtab-folder:{folder.resolve()}",
        class_names=class_names,
        splits=splits,
        task=task.name if task else None,
        group=task.group if task else None,
        sampling=_clip_sampling(splits),
    )


def _read_list_file(list_file: Path, root: Path, sampling: FrameSampling | None = None) -> FileSplit | ClipSplit:
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        relative, _, label = line.strip().rpartition(" ")
        try:
            value = int(label)  # any Unicode decimal digits; "²" or "1.0" are refused
        except ValueError:
            value = None
        if not relative or value is None:
            raise SidetuneError(
                f"Line {number} of {list_file} is '{line.strip()}'; each line must be "
                "'relative/path label' with an integer label. Fix the list file."
            )
        path = root / relative  # an absolute path stays as it is
        if not (path.is_file() or (path.is_dir() and is_clip(path))):
            raise SidetuneError(
                f"Image {path} (line {number} of {list_file}) does not exist. Restore the file or "
                "remove its line from the list file."
            )
        paths.append(path)
        labels.append(value)
    if paths and any(is_clip(path) for path in paths[:1]):  # a video dataset: clips, not images
        return ClipSplit(paths, np.asarray(labels, dtype=np.int64), root, sampling or FrameSampling())
    return FileSplit(paths, np.asarray(labels, dtype=np.int64), root)


def _clip_sampling(splits: dict) -> FrameSampling | None:
    return next((split.sampling for split in splits.values() if isinstance(split, ClipSplit)), None)


def is_class_folder(folder: Path) -> bool:
    return any(child.is_dir() for child in folder.iterdir())


def load_class_folder(folder: Path, sampling: FrameSampling | None = None) -> ImageSource:
    """Images (or clips: video files, frame folders) under `<class>/` sub-folders. If the top
    level holds split folders (train/, val/, test/ ...) each becomes a split; otherwise a seeded,
    stratified 80/20 train/test split is drawn and recorded (and `load_source` carves val from
    train). A clip dataset's clips are read by `sampling` (default: 8 frames, uniformly)."""
    subdirs = sorted(child for child in folder.iterdir() if child.is_dir())
    split_dirs = [d for d in subdirs if d.name in FOLDER_SPLIT_NAMES]
    notes = []
    class_dirs = [c for d in split_dirs for c in d.iterdir() if c.is_dir()] if split_dirs else subdirs
    if any(is_clip(item) for class_dir in class_dirs[:3] for item in sorted(class_dir.iterdir())[:3]):
        sampling = sampling or FrameSampling()
    else:
        sampling = None  # images
    if split_dirs and len(split_dirs) == len(subdirs):
        class_names = sorted({c.name for d in split_dirs for c in d.iterdir() if c.is_dir()})
        splits = {d.name: _scan_classes(d, class_names, folder, sampling) for d in split_dirs}
    else:
        class_names = [d.name for d in subdirs]
        everything = _scan_classes(folder, class_names, folder, sampling)
        train, test = stratified_split(everything.labels, HOLDOUT_FRACTION, HOLDOUT_SEED)
        splits = {"train": everything.subset(train), "test": everything.subset(test)}
        notes.append(
            f"no split folders: a stratified {1 - HOLDOUT_FRACTION:.0%}/{HOLDOUT_FRACTION:.0%} "
            f"train/test split with seed {HOLDOUT_SEED}"
        )
    if not class_names:
        raise SidetuneError(f"Image folder {folder} has no class sub-folders. Put images under <class>/ folders.")
    kind = "video-folder" if sampling else "image-folder"
    return ImageSource(folder.name, f"{kind}:{folder.resolve()}", class_names, splits, notes=notes, sampling=sampling)


def _scan_classes(folder: Path, class_names: list[str], root: Path,
                  sampling: FrameSampling | None = None) -> FileSplit | ClipSplit:
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        class_dir = folder / class_name
        if not class_dir.is_dir():
            continue
        if sampling is not None:  # clips: the class folder's video files and frame folders
            clips = [path for path in sorted(class_dir.iterdir()) if is_clip(path)]
            paths += clips
            labels += [label] * len(clips)
            continue
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                paths.append(path)
                labels.append(label)
    if sampling is not None and paths:
        return ClipSplit(paths, np.asarray(labels, dtype=np.int64), root, sampling)
    if not paths:
        raise SidetuneError(
            f"No images found under {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files "
            "inside class folders)."
        )
    return FileSplit(paths, np.asarray(labels, dtype=np.int64), root)
