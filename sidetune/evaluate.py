"""Scoring a finished run on any split of its cache, cached or live:

    sidetune evaluate --run runs/dtd-last-... --split test

A cached split is read from the cache; a live one (VTAB-1k's test, by default) runs through
the backbone the cache records (sidetune/live.py). The result is printed and written to the
run directory as eval-<split>.json."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

from sidetune import runs
from sidetune.cache.manifest import identity_differences
from sidetune.cache.reader import open_cache
from sidetune.compute import resolve_device
from sidetune.errors import SidetuneError
from sidetune.progress import ProgressSink
from sidetune.training import TrainConfig, restore_sidenet
from sidetune.training.data import LoadedSplits
from sidetune.training.scoring import accuracy, predicted_classes_together, seen_warning


def evaluate(run_dir: str | Path, split: str = "test", *, which: str = "last", cache: str | Path | None = None,
             weights: str | Path | None = None, data_root: str | Path | None = None, device: str = "auto",
             batch_size: int = 64, progress: ProgressSink | None = None,
             warn: Callable[[str], None] = lambda message: None) -> dict:
    """Top-1 and per-class accuracy of a run's side network (`which`: 'last' or 'best') on
    `split`; `cache` when the run's cache moved, `weights` and `data_root` when the backbone's
    weights or the images of a live split did; `progress` hears a live split's images go
    through the backbone; `warn` hears that `split` holds images the run trained on (the record
    says how many). Writes eval-<split>.json into the run."""
    run = runs.open_run(run_dir)
    opened = open_cache(cache or run.config["cache"]).relocate(weights, data_root)
    differences = identity_differences(opened.manifest, run.cache_manifest)
    if differences:
        raise SidetuneError(f"Cache {opened.path} is not the one run {run.path} was trained from "
                            f"({'; '.join(differences)}). Pass --cache with that cache.")
    torch_device = resolve_device(device)
    config = TrainConfig.from_record(run.config["config"])
    net = restore_sidenet(opened.info, config, run.state(which)).to(torch_device)
    loaded = LoadedSplits(opened, torch_device, progress=progress)
    [predicted], labels = predicted_classes_together(opened, [net], split, torch_device, loaded, batch_size)
    top1, per_class = accuracy(predicted, labels, len(opened.class_names))
    record = {
        "split": split, "kind": opened.split(split).kind, "which": which, "top1": top1, "images": len(labels),
        "per_class_top1": {name: None if value != value else value for name, value in zip(opened.class_names, per_class)},
        "cache": str(opened.path), "device": torch_device.type,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    record["images_seen_in_training"] = seen = opened.shared_images(run.config["train_split"], split)
    if seen:
        warn(seen_warning(opened, run.config["train_split"], split, seen))
    runs.write_json(run.path / f"eval-{split}.json", record)
    return record

