"""Sweeps: many side-network configurations trained from one cache in one process.

    sidetune sweep --cache ./cache/dtd --method last --lr 3e-4,1e-3,3e-3 --wd 1e-4,1e-3 --rank 8,16

A grid expands to `TrainConfig`s; configs that share a group key (same method, options,
epochs, batch size, batch order) are stacked and trained together by the engine, sharing every
batch; different shapes form separate groups, and a large group is cut into stacks of at most
`max_stack`. With the VTAB-1k protocol every config trains on train800 and is scored on
val200; the best (top-k) is retrained on train800val200 and reported on test. Selection never
sees test."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from sidetune import runs
from sidetune.cache.reader import Cache, open_cache
from sidetune.engine import EpochStats, TrainConfig, TrainResult, train_group
from sidetune.compute import resolve_device
from sidetune.errors import SidetuneError
from sidetune.results import plot_sweep
from sidetune.sidenets import method_options
from sidetune.train import default_splits

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
FIELD_TYPES = {"lr": float, "weight_decay": float, "label_smoothing": float, "seed": int, "epochs": int,
               "warmup_epochs": int, "batch_size": int, "data_seed": int}


def expand_grid(method: str, grid: dict[str, list], fixed: dict[str, object] | None = None) -> list[TrainConfig]:
    """Every combination of the grid's values (in order, the last key varying fastest), with
    the fixed settings; keys are TrainConfig fields (lr, weight_decay, seed, ...) or options of
    the method (rank, pool, ...)."""
    fixed = dict(fixed or {})
    options = method_options(method)
    known = set(FIELD_TYPES) | set(options)
    unknown = sorted((set(grid) | set(fixed)) - known)
    if unknown:
        raise SidetuneError(f"Unknown sweep setting {', '.join(unknown)} for method {method}; sweepable: "
                            f"{', '.join(sorted(known))}.")
    keys = list(grid)
    configs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = {**fixed, **dict(zip(keys, values))}
        config_fields = {k: FIELD_TYPES[k](v) for k, v in settings.items() if k in FIELD_TYPES}
        config_options = {k: v for k, v in settings.items() if k in options}
        configs.append(TrainConfig.create(method, config_options, **config_fields))
    if len(set(configs)) != len(configs):
        raise SidetuneError("The sweep lists the same configuration twice; remove the repeated values.")
    return configs


def load_grid(path: str | Path) -> tuple[str | None, dict[str, list], dict[str, object]]:
    """A YAML grid file: `method`, fixed settings at the top level, lists under `grid`.

        method: last
        epochs: 100
        grid: {lr: [3.0e-4, 1.0e-3], rank: [8, 16]}
    """
    path = Path(path)
    try:
        record = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SidetuneError(f"Could not read the sweep grid {path}: {error}.") from error
    if not isinstance(record, dict) or not isinstance(record.get("grid"), dict):
        raise SidetuneError(f"Sweep grid {path} must be a YAML mapping with a 'grid' mapping of lists "
                            "(e.g. grid: {lr: [1.0e-3, 3.0e-3]}), and fixed settings beside it.")
    grid = {k: v if isinstance(v, list) else [v] for k, v in record.pop("grid").items()}
    method = record.pop("method", None)
    return method, grid, record


@dataclass
class SweepRow:
    """One line of results.jsonl / results.csv."""

    config_id: int
    phase: str  # "select" (scored on the selection split), "final" (retrained, reported) or "single"
    train_split: str
    eval_split: str
    status: str
    top1: float | None
    seconds: float
    params: int
    config: TrainConfig
    failure: str | None = None

    def record(self) -> dict:
        return {"config_id": self.config_id, "phase": self.phase, "status": self.status, "top1": self.top1,
                "train_split": self.train_split, "eval_split": self.eval_split, "seconds": round(self.seconds, 3),
                "params": self.params, **self.config.hyperparameters(), "failure": self.failure}


@dataclass
class SweepReport:
    out: Path
    rows: list[SweepRow]
    best: SweepRow  # the reported configuration (final phase under the VTAB protocol)
    protocol: str


def plan_stacks(configs: list[TrainConfig], max_stack: int) -> list[list[int]]:
    """Indices of configs grouped by group key (in first-seen order), each group cut into
    stacks of at most `max_stack`."""
    groups: dict[tuple, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(config.group_key(), []).append(index)
    return [members[i:i + max_stack] for members in groups.values() for i in range(0, len(members), max_stack)]


def run_configs(cache: Cache, configs: list[TrainConfig], train_split: str, eval_split: str, *, device,
                max_stack: int, memory_budget: int | None, on_stack: Callable[[int, int, list[TrainConfig]], None] | None,
                on_epoch: Callable[[EpochStats], None] | None) -> list[TrainResult]:
    """Train every config (stacked by group key), results in the order of `configs`."""
    results: list[TrainResult | None] = [None] * len(configs)
    stacks = plan_stacks(configs, max_stack)
    for number, stack in enumerate(stacks):
        if on_stack is not None:
            on_stack(number, len(stacks), [configs[i] for i in stack])
        stack_results = train_group(cache, [configs[i] for i in stack], train_split, eval_split, device,
                                    memory_budget=memory_budget, on_epoch=on_epoch)
        for index, result in zip(stack, stack_results):
            results[index] = result
    return results  # type: ignore[return-value]


def sweep(
    cache: str | Path | Cache,
    configs: list[TrainConfig],
    *,
    out: str | Path | None = None,
    protocol: str = "auto",
    top_k: int = 1,
    train_split: str | None = None,
    eval_split: str | None = None,
    device: str = "auto",
    max_stack: int = 64,
    memory_budget: int | None = None,
    on_stack: Callable[[int, int, list[TrainConfig]], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> SweepReport:
    """Train every configuration and write results.jsonl, results.csv and sweep.png to `out`.

    protocol 'vtab' (the default when the cache has the VTAB-1k splits): select on
    train800 -> val200, retrain the top-k on train800val200, report on test. 'none': train on
    one split and score on another (defaults as for `train`)."""
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if not configs:
        raise SidetuneError("The sweep has no configurations; give at least one value for each setting.")
    has_vtab = all(split in cache.splits for split in VTAB_SPLITS)
    if protocol == "auto":
        protocol = "vtab" if has_vtab and train_split is None and eval_split is None else "none"
    if protocol not in ("vtab", "none"):
        raise SidetuneError(f"Unknown protocol '{protocol}'; choose vtab, none or auto.")
    if protocol == "vtab" and not has_vtab:
        missing = [s for s in VTAB_SPLITS if s not in cache.splits]
        raise SidetuneError(f"--protocol vtab needs the splits {', '.join(VTAB_SPLITS)}; cache {cache.path} lacks "
                            f"{', '.join(missing)}. Extract them, or use --protocol none.")
    torch_device = resolve_device(device)
    out = Path(out) if out is not None else runs.default_run_dir(cache.path, "sweep")
    out.mkdir(parents=True, exist_ok=True)
    common = dict(device=torch_device, max_stack=max_stack, memory_budget=memory_budget, on_stack=on_stack, on_epoch=on_epoch)

    rows: list[SweepRow] = []
    if protocol == "vtab":
        selected = run_configs(cache, configs, "train800", "val200", **common)
        rows += [_row(i, "select", "train800", "val200", r) for i, r in enumerate(selected)]
        ranked = sorted((row for row in rows if row.status == "ok"), key=lambda row: -row.top1)
        if not ranked:
            raise SidetuneError("Every configuration diverged during selection; lower the learning rates.")
        chosen = [row.config_id for row in ranked[:top_k]]
        final = run_configs(cache, [configs[i] for i in chosen], "train800val200", "test", **common)
        final_rows = [_row(i, "final", "train800val200", "test", r) for i, r in zip(chosen, final)]
        rows += final_rows
        best = max((row for row in final_rows if row.status == "ok"), key=lambda row: row.top1, default=final_rows[0])
    else:
        train_split, eval_split = default_splits(cache, train_split, eval_split)
        results = run_configs(cache, configs, train_split, eval_split, **common)
        rows = [_row(i, "single", train_split, eval_split, r) for i, r in enumerate(results)]
        ok = [row for row in rows if row.status == "ok"]
        if not ok:
            raise SidetuneError("Every configuration diverged; lower the learning rates.")
        best = max(ok, key=lambda row: row.top1)

    write_results(out, rows, {"cache": str(cache.path), "protocol": protocol, "top_k": top_k,
                              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "best": best.record(), "train_command": train_command(cache.path, best.config)})
    scored = [row for row in rows if row.phase in ("select", "single")]
    plot_sweep([row.record() for row in scored], out / "sweep.png",
               f"{cache.manifest['dataset']['name']}: {configs[0].method}, {scored[0].eval_split} top-1")
    return SweepReport(out, rows, best, protocol)


def _row(config_id: int, phase: str, train_split: str, eval_split: str, result: TrainResult) -> SweepRow:
    return SweepRow(config_id, phase, train_split, eval_split, result.status, result.top1, result.seconds,
                    result.params, result.config, result.failure)


def write_results(out: Path, rows: list[SweepRow], summary: dict) -> None:
    records = [row.record() for row in rows]
    (out / "results.jsonl").write_text("".join(json.dumps(r, default=_plain) + "\n" for r in records))
    columns = list(dict.fromkeys(key for record in records for key in record))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(records)
    runs.write_json(out / "sweep.json", summary)


def _plain(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def train_command(cache_path: str | Path, config: TrainConfig) -> str:
    """The `sidetune train` command line that trains `config` alone."""
    flags = {"method": config.method, "epochs": config.epochs, "lr": config.lr, "wd": config.weight_decay,
             "warmup-epochs": config.warmup_epochs, "batch-size": config.batch_size,
             "label-smoothing": config.label_smoothing, "seed": config.seed, "data-seed": config.data_seed}
    parts = ["sidetune", "train", "--cache", str(cache_path)]
    parts += [f"--{name} {value}" for name, value in flags.items()]
    for name, value in config.options:
        if name == "zero_init_out":
            continue  # not a CLI option; the default (True) is the only value the CLI trains
        flag = name.replace("_", "-")
        parts.append((f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}")
    return " ".join(parts)
