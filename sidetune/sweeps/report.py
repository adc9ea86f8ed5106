"""A finished sweep's files: results.jsonl and .csv, sweep.json with the best configuration and
the `sidetune train` command that reproduces it, and sweep.png."""

from __future__ import annotations

import csv
import datetime as dt
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sidetune import runs
from sidetune.cache.reader import Cache
from sidetune.declarations import option_flag
from sidetune.results import plot_sweep
from sidetune.sweeps.journal import SweepRow, write_rows
from sidetune.training import TrainConfig

if TYPE_CHECKING:
    from sidetune.sweeps.protocol import Protocol


@dataclass
class SweepReport:
    out: Path
    rows: list[SweepRow]
    best: SweepRow  # the reported configuration (final phase under the validation protocol)
    protocol: Protocol
    seconds: float = 0.0  # this run's wall time (a resumed sweep: since it resumed)
    eval_images_seen_in_training: int = 0  # images of the selection split that are in its training split
    models: dict[int, str] = field(default_factory=dict)  # config id -> its kept model's run directory (the top-k)


def write_results(report: SweepReport, cache: Cache, method: str, top_k: int, world_size: int) -> None:
    """results.jsonl, results.csv, sweep.json (with the best config's train command) and sweep.png."""
    out, rows = report.out, report.rows
    write_rows(out / "results.jsonl", rows)
    records = [row.record() for row in rows]
    columns = list(dict.fromkeys(key for record in records for key in record))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(records)
    runs.write_json(out / "sweep.json", {
        "cache": str(cache.path), "protocol": report.protocol.name, "protocol_description": report.protocol.describe(),
        "selected_on": report.protocol.select, "selected_on_test": report.protocol.selected_on_test,
        "top_k": top_k, "ranks": world_size,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "seconds": round(report.seconds, 3),
        "configurations": len({row.config_id for row in rows}),
        "eval_images_seen_in_training": report.eval_images_seen_in_training,
        "models": {str(config_id): path for config_id, path in report.models.items()}, "best": report.best.record(),
        "train_command": train_command(cache.path, report.best.config, report.best.train_split, report.best.eval_split)})
    scored = [row for row in rows if row.phase in ("select", "single")]
    plot_sweep([row.record() for row in scored], out / "sweep.png",
               f"{cache.info.dataset_name}: {method}, {scored[0].eval_split} top-1")


def train_command(cache_path: str | Path, config: TrainConfig, train_split: str, eval_split: str) -> str:
    """The `sidetune train` command line that trains `config` alone on `train_split` and scores
    it on `eval_split`: every setting spelled out, so it reproduces the sweep's number."""
    flags = {"method": config.method, "epochs": config.epochs, "lr": config.lr, "wd": config.weight_decay,
             "warmup-epochs": config.warmup_epochs, "batch-size": config.batch_size,
             "label-smoothing": config.label_smoothing, "seed": config.seed, "data-seed": config.data_seed}
    if config.augment != "none":
        flags.update({"augment": config.augment, "augment-magnitude": config.augment_magnitude})
    if config.views is not None:
        flags["views"] = config.views
    parts = ["sidetune", "train", "--cache", shlex.quote(str(cache_path)), "--train-split", train_split,
             "--eval-split", eval_split]
    parts += [f"--{name} {value}" for name, value in flags.items()]
    parts += [option_flag(name, value) for name, value in config.options]  # each declared option is a train flag
    return " ".join(parts)
