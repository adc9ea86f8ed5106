"""Datasets: turn `--dataset NAME|PATH` into an `ImageSource` of named splits."""

from __future__ import annotations

import os
from pathlib import Path

from sidetune.datasets.catalogue import FGVC_TASKS, FOLDER_ALIASES, GROUPS, VTAB_SPLITS, VTAB_TASKS, FgvcTask, VtabTask
from sidetune.datasets.digits import load_digits_source
from sidetune.datasets.folders import is_class_folder, is_list_folder, load_class_folder, load_list_folder
from sidetune.datasets.hub import is_saved_dataset, load_hub_dataset, load_saved_dataset, load_vtab_from_hub
from sidetune.datasets.json_splits import is_json_folder, load_json_folder
from sidetune.datasets.sources import ImageSource, ImageSplit, check_data
from sidetune.datasets.validation import with_validation
from sidetune.datasets.video import ClipSplit, FrameSampling, count_frames
from sidetune.errors import SidetuneError

DATA_ROOT_ENV = "SIDETUNE_DATA"
BUNDLED = ("digits",)

__all__ = ["FGVC_TASKS", "GROUPS", "VTAB_SPLITS", "VTAB_TASKS", "FgvcTask", "ImageSource", "ImageSplit", "VtabTask",
           "load_source"]


def load_source(
    dataset: str,
    data_root: str | Path | None = None,
    splits: list[str] | None = None,
    limit: int | None = None,
    sampling: FrameSampling | None = None,
) -> ImageSource:
    """Resolve a dataset name or path.

    In order: `digits`; `hf:org/name`; an existing path (VTAB-1k list folder, VPT-style JSON
    split folder, `save_to_disk` folder, or class-folder of images); a VTAB-1k task name, read
    from `<data_root or $SIDETUNE_DATA>/<task>/` when present, else from its hub copy; an FGVC
    task name, read from its folder under the data root in VPT's layout. A dataset without a
    validation split gets one carved from its training split (`with_validation`). A folder of
    clips (video files or frame folders) is a video dataset, its clips read by `sampling`
    (default: 8 frames spread uniformly; sidetune/datasets/video.py).
    """
    source = with_validation(_resolve(dataset, data_root, sampling))
    if sampling is not None and source.sampling is None:
        raise SidetuneError(f"--frames and --frame-stride read clips, but {dataset} holds images. Leave them out, or "
                            "point --dataset at a folder of video files or frame folders.")
    source = source.select_splits(splits).first(limit)
    check_data(source)
    if source.sampling is not None:
        needed = source.sampling.needed() or source.sampling.frames
        clips = {path for split in source.splits.values() if isinstance(split, ClipSplit) for path in split.paths}
        short = sum(0 < count_frames(path) < needed for path in clips)  # an unreadable clip: named when read
        if short:
            source.notes.append(f"{short} clip{'s' if short > 1 else ''} {'have' if short > 1 else 'has'} fewer frames "
                                "than the sampling reads: padded by repeating the last frame")
    return source


def _resolve(dataset: str, data_root: str | Path | None, sampling: FrameSampling | None = None) -> ImageSource:
    if dataset == "digits":
        return load_digits_source()
    if dataset.startswith("hf:"):
        return load_hub_dataset(dataset[3:])
    path = Path(dataset).expanduser()
    if path.is_dir():
        return _load_folder(path, sampling)
    if path.exists():
        raise SidetuneError(f"Dataset path {path} is a file; pass a folder (VTAB-1k list folder, image folder or save_to_disk folder).")
    if dataset in FGVC_TASKS:
        return load_fgvc(FGVC_TASKS[dataset], data_root)
    task = VTAB_TASKS.get(dataset)
    if task is not None:
        folder = find_vtab_folder(task, data_root)
        if folder is not None:
            return load_list_folder(folder, task.name)
        if task.hub_id is None:
            raise SidetuneError(
                f"No local VTAB-1k folder for {task.name} was found (looked in --data-root / "
                f"${DATA_ROOT_ENV}) and it has no hub copy. Download the VTAB-1k release and pass "
                f"--data-root /path/to/vtab-1k (holding {task.name}/train800.txt ...)."
            )
        source = load_vtab_from_hub(task)
        if data_root or os.environ.get(DATA_ROOT_ENV):
            source.notes.insert(0, f"no {task.name}/ folder with VTAB-1k list files under "
                                   f"{data_root or os.environ[DATA_ROOT_ENV]}; using the hub copy")
        return source
    raise SidetuneError(
        f"Unknown dataset '{dataset}'. Choose a VTAB-1k task ({', '.join(VTAB_TASKS)}), an FGVC task "
        f"({', '.join(FGVC_TASKS)}), a bundled dataset ({', '.join(BUNDLED)}), a hub id as hf:org/name, or a path to a "
        "folder (VTAB-1k list folder, VPT-style train/val/test.json folder, class-folder of images, or "
        "datasets.save_to_disk folder)."
    )


def load_fgvc(task: FgvcTask, data_root: str | Path | None) -> ImageSource:
    """An FGVC task from its folder under the data root, in VPT's layout."""
    root = data_root or os.environ.get(DATA_ROOT_ENV)
    if root and not Path(root).expanduser().is_dir():
        raise SidetuneError(f"Data root {root} does not exist. Pass --data-root (or ${DATA_ROOT_ENV}) the folder "
                            f"holding the FGVC dataset folders.")
    for candidate in task.folders if root else ():
        folder = Path(root).expanduser() / candidate
        if folder.is_dir() and is_json_folder(folder):
            return load_json_folder(folder, task.name, task.image_dir)
    raise SidetuneError(
        f"No {task.name} folder in VPT's layout under --data-root / ${DATA_ROOT_ENV} ({root or 'not set'}): looked for "
        f"{', '.join(task.folders)} holding train.json, val.json and test.json. Download the dataset and VPT's split "
        "files (KMnP/vpt's README links them), and pass --data-root the folder that holds it. sidetune has no hub copy "
        "with VPT's splits to fall back on."
    )


def _load_folder(path: Path, sampling: FrameSampling | None = None) -> ImageSource:
    if is_list_folder(path):
        return load_list_folder(path, sampling=sampling)
    if is_json_folder(path):
        return load_json_folder(path)
    if is_saved_dataset(path):
        return load_saved_dataset(path)
    if is_class_folder(path):
        return load_class_folder(path, sampling)
    raise SidetuneError(
        f"Folder {path} is not a dataset sidetune knows: expected VTAB-1k list files "
        f"({', '.join(s + '.txt' for s in VTAB_SPLITS)}), VPT's train.json, val.json and test.json, a "
        "datasets.save_to_disk folder, or class sub-folders of images."
    )


def find_vtab_folder(task: VtabTask, data_root: str | Path | None) -> Path | None:
    root = data_root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        return None
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SidetuneError(f"Data root {root} does not exist. Pass --data-root (or ${DATA_ROOT_ENV}) a VTAB-1k folder.")
    for candidate in (task.name, *FOLDER_ALIASES.get(task.name, ())):
        folder = root / candidate
        if folder.is_dir() and is_list_folder(folder):
            return folder
    return None
