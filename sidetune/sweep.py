"""Sweeps: many side-network configurations trained from one cache in one process.

    sidetune sweep --cache ./cache/dtd --method last --lr 3e-4,1e-3,3e-3 --wd 1e-4,1e-3 --rank 8,16

A grid expands to `TrainConfig`s; configs that share a group key (same method, options,
epochs, batch size, batch order) are stacked and trained together by the engine, sharing every
batch; different shapes form separate groups, and a group is cut into stacks that fit the
device's memory (sidetune/stacking.py). Under torchrun the configs are shared out between the
ranks. With the VTAB-1k protocol every config trains on train800 and is scored on
val200; the best (top-k) is retrained on train800val200 and reported on test. Selection never
sees test."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import yaml

from sidetune import runs
from sidetune.loading import LoadedSplits
from sidetune.cache.reader import Cache, open_cache
from sidetune.compute import resolve_device
from sidetune.datasets.catalogue import VTAB_SPLITS
from sidetune.distributed import World, current_world
from sidetune.engine import EpochStats, TrainConfig, TrainResult, score, train_group
from sidetune.errors import SidetuneError
from sidetune.halving import Halving, train_with_halving
from sidetune.results import plot_sweep
from sidetune.sidenets import SIDENETS, declared_options, method_options
from sidetune.stacking import default_stack_limit, plan_stacks, stack_capacity
from sidetune.tensorboard_log import TensorBoardLog
from sidetune.train import default_splits

if TYPE_CHECKING:  # stage two never imports the backbone code at run time
    from sidetune.progress import ProgressSink

StackCallback = Callable[[int, int, list[TrainConfig]], None]  # (stack number, stacks, its configs)
FIELD_TYPES = {"lr": float, "weight_decay": float, "label_smoothing": float, "seed": int, "epochs": int,
               "warmup_epochs": int, "batch_size": int, "data_seed": int, "augment": str, "augment_magnitude": float}
# The smallest value each numeric training setting takes (lr must be above it).
LOWEST = {"lr": 0.0, "weight_decay": 0.0, "label_smoothing": 0.0, "epochs": 1, "warmup_epochs": 0, "batch_size": 1,
          "augment_magnitude": 0.0}  # a method option's least value is its own declaration's
FLAGS = {"weight_decay": "wd"}


def checked_value(name: str, value: object, kind: type) -> object:
    """`value` of the sweep setting `name` as `kind`, or one line saying what is wrong."""
    flag = "--" + FLAGS.get(name, name).replace("_", "-")
    if kind is bool or kind is str:
        return value
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise SidetuneError(f"{flag} got {value!r}, which is not {'an integer' if kind is int else 'a number'}; "
                            f"give comma-separated values, e.g. {flag} {'8,16' if kind is int else '1e-3,3e-3'}.") from None
    lowest = LOWEST.get(name) if name in FIELD_TYPES or name in LOWEST else declared_options()[name].minimum
    if lowest is not None and (number < lowest or (name == "lr" and number <= lowest)):
        bound = "above 0" if name == "lr" else f"at least {lowest}"
        raise SidetuneError(f"{flag} got {value!r}; it must be {bound}.")
    if name == "label_smoothing" and number >= 1:
        raise SidetuneError(f"{flag} got {value!r}; label smoothing must be below 1.")
    return number


def expand_grid(method: str, grid: dict[str, list], fixed: dict[str, object] | None = None) -> list[TrainConfig]:
    """Every combination of the grid's values (in order, the last key varying fastest), with
    the fixed settings; keys are TrainConfig fields (lr, weight_decay, seed, ...) or options of
    the method (rank, pool, ...)."""
    fixed, grid = dict(fixed or {}), dict(grid)
    options = method_options(method)
    known = set(FIELD_TYPES) | set(options)
    unknown = sorted((set(grid) | set(fixed)) - known)
    if unknown:
        raise SidetuneError(f"Unknown sweep setting {', '.join(unknown)} for method {method}; sweepable: "
                            f"{', '.join(sorted(known))}.")
    kinds = {**FIELD_TYPES, **{name: type(default) for name, default in options.items()}}
    for name, values in grid.items():
        if not values:
            raise SidetuneError(f"--{FLAGS.get(name, name).replace('_', '-')} has no values; give at least one.")
        grid[name] = [checked_value(name, value, kinds[name]) for value in values]
    fixed = {name: checked_value(name, value, kinds[name]) for name, value in fixed.items()}
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


def default_grid(method: str) -> dict[str, list]:
    """The values `sweep` tries for `method` when given none (docs/methods.md)."""
    method_options(method)  # refuses an unknown method
    return {name: list(values) for name, values in SIDENETS[method].default_grid.items()}


def estimate_seconds(cache: Cache, configs: list[TrainConfig], device: str | torch.device, *, protocol: str = "auto",
                     top_k: int = 1, max_stack: int | None = None, train_split: str | None = None) -> float:
    """A rough wall time for `sweep`: one training step of each group's stack timed on a real
    batch (after the steps that warm up and capture it), times the steps its stacks take, for
    selection and the top-k's retraining (or the one phase of protocol none, on `train_split`)."""
    device = resolve_device(device) if isinstance(device, str) else device
    vtab = protocol == "vtab" or (protocol == "auto" and train_split is None
                                  and all(split in cache.splits for split in VTAB_SPLITS))
    train_split = "train800" if vtab else train_split or default_splits(cache)[0]
    groups: dict[tuple, list[TrainConfig]] = {}
    for config in configs:
        groups.setdefault(config.group_key(), []).append(config)
    limit = max_stack or default_stack_limit(device) or 64
    total = 0.0
    for members in groups.values():
        stack = min(len(members), limit)
        seconds = _step_seconds(cache, members[:stack], train_split, device)
        steps = math.ceil(cache.split(train_split).num_images / members[0].batch_size) * members[0].epochs
        if SIDENETS[members[0].method].closed_form:  # one solve, about a pass over the split
            steps = math.ceil(cache.split(train_split).num_images / members[0].batch_size)
        total += seconds * steps * math.ceil(len(members) / stack)
    if vtab:  # the top-k retrained on train800val200 (1.25x the images), about one stack's worth
        first = configs[0]
        steps = math.ceil(cache.split("train800val200").num_images / first.batch_size)
        steps *= 1 if SIDENETS[first.method].closed_form else first.epochs
        total += _step_seconds(cache, configs[:min(top_k, len(configs))], "train800val200", device) * steps
    return total


def _step_seconds(cache: Cache, configs: list[TrainConfig], split: str, device: torch.device) -> float:
    from sidetune.engine import StackedStep, build_sidenet
    from sidetune.optim import StackedAdamW

    first = configs[0]
    if len({c.group_key() for c in configs}) > 1:
        configs = [c for c in configs if c.group_key() == first.group_key()]
    net = build_sidenet(cache, first.method, dict(first.options), len(configs))
    net.reset_parameters([c.seed for c in configs])
    net.to(device)
    stored = cache.split(split).stored
    rows = slice(0, min(first.batch_size, stored.num_images))
    tokens = torch.from_numpy(stored.read_rows(rows, net.stages_needed())).to(device)
    labels = torch.from_numpy(stored.labels[rows]).to(device)
    optimizer = StackedAdamW(net, torch.tensor([c.lr for c in configs]), torch.tensor([c.weight_decay for c in configs]))
    step = StackedStep(net, optimizer, torch.zeros(len(configs)), len(labels), tuple(tokens.shape[1:]), tokens.dtype,
                       cuda_graphs=device.type == "cuda")
    step(tokens, labels, 1, 1.0)  # warms up (and on CUDA captures)
    _synchronize(device)
    started = time.perf_counter()
    for number in range(2, 4):
        step(tokens, labels, number, 1.0)
    _synchronize(device)
    return (time.perf_counter() - started) / 2


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    process_rank: int = 0  # the torchrun rank that trained it
    epochs_trained: int | None = None  # fewer than its epochs when successive halving pruned it

    def record(self) -> dict:
        return {"config_id": self.config_id, "phase": self.phase, "status": self.status, "top1": self.top1,
                "train_split": self.train_split, "eval_split": self.eval_split, "seconds": round(self.seconds, 3),
                "params": self.params, **self.config.hyperparameters(), "failure": self.failure, "process_rank": self.process_rank,
                "epochs_trained": self.epochs_trained}


@dataclass
class SweepReport:
    out: Path
    rows: list[SweepRow]
    best: SweepRow  # the reported configuration (final phase under the VTAB protocol)
    protocol: str
    seconds: float = 0.0  # this run's wall time (a resumed sweep: since it resumed)


def append_rows(path: Path, rows: list[SweepRow]) -> None:
    """Add finished rows to a rank's journal (ranks/rank-R.jsonl), one stack at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as journal:
        for row in rows:
            record = {f.name: getattr(row, f.name) for f in fields(row) if f.name != "config"}
            journal.write(json.dumps({**record, "config": row.config.describe()}, default=_plain) + "\n")


def finished_rows(out: Path, phase: str, configs: dict[int, TrainConfig], train_split: str,
                  eval_split: str) -> dict[int, SweepRow]:
    """The rows of `phase` that an earlier, interrupted run of this sweep finished (from every
    rank's journal), by config id; refuses a folder that holds another sweep."""
    done: dict[int, SweepRow] = {}
    for path in sorted((out / "ranks").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            if record["phase"] != phase or record["config_id"] not in configs:
                continue  # another phase, or a config this run does not ask for (e.g. a smaller --top-k)
            config = TrainConfig.from_record(record.pop("config"))
            row = SweepRow(**record, config=config)
            if configs[row.config_id] != config or (row.train_split, row.eval_split) != (train_split, eval_split):
                raise SidetuneError(f"{out} holds a sweep with other settings (config {row.config_id} differs). Rerun "
                                    "with its settings to resume it, or choose another --out.")
            done[row.config_id] = row
    return done


def run_configs(cache: Cache, configs: dict[int, TrainConfig], phase: str, train_split: str, eval_split: str, *,
                out: Path, world: World, device: torch.device, max_stack: int | None, memory_budget: int | None, compile: bool, fused: bool,
                cuda_graphs: bool | None, loaded: LoadedSplits, board: TensorBoardLog | None, halving: Halving | None,
                on_stack: StackCallback | None, on_epoch: Callable[[EpochStats], None] | None) -> list[SweepRow]:
    """Train configs (keyed by config id) and return every config's row, ordered by id, on
    every rank. Configs an interrupted run of this sweep finished are not trained again. Each
    group of same-shape configs is shared out between the ranks, and each rank's share is cut
    into stacks that fit its device's memory (and `max_stack`); every finished stack is
    journaled to ranks/rank-R.jsonl. `loaded` holds the splits' features for every stack and
    both phases (views share their stored split's)."""
    done = world.broadcast(finished_rows(out, phase, configs, train_split, eval_split) if world.is_main else None)
    groups: dict[tuple, list[int]] = {}
    for config_id, config in configs.items():
        if config_id not in done:
            groups.setdefault(config.group_key(), []).append(config_id)
    shares = {key: share for key, members in groups.items() if (share := world.share(members))}
    mine = [config_id for share in shares.values() for config_id in share]
    limit = max_stack or default_stack_limit(device)
    capacity = {}
    for key, share in shares.items():  # measured only for the groups this rank trains
        fit = stack_capacity(cache, configs[share[0]], train_split, eval_split, device, memory_budget=memory_budget)
        capacity[key] = min(fit, limit) if limit else fit
    ordered = [configs[config_id] for config_id in mine]
    live = cache.split(eval_split).kind == "live"  # scored once for every stack, below: one backbone pass
    rows, pending = [], []
    stacks = plan_stacks(ordered, capacity)
    num_images = cache.split(train_split).num_images

    def logged(stack: list[int]) -> Callable[[EpochStats], None] | None:
        if board is None:
            return on_epoch

        def epoch_done(stats: EpochStats) -> None:
            board.epoch([f"{phase}-{mine[i]}" for i in stack], [ordered[i] for i in stack], stats, num_images)
            if on_epoch is not None:
                on_epoch(stats)
        return epoch_done

    for number, stack in enumerate(stacks):
        if on_stack is not None:
            on_stack(number, len(stacks), [ordered[i] for i in stack])
        options = dict(memory_budget=memory_budget, compile=compile, fused=fused, cuda_graphs=cuda_graphs, loaded=loaded)
        if halving is not None and phase != "final":
            results = train_with_halving(cache, [ordered[i] for i in stack], train_split, eval_split, device, halving,
                                         on_epoch_of=lambda alive, stack=stack: logged([stack[i] for i in alive]), **options)
        else:
            results = train_group(cache, [ordered[i] for i in stack], train_split, eval_split, device,
                                  on_epoch=logged(stack), evaluate=not live, **options)
        if live:
            pending += zip(stack, results)
            continue
        stack_rows = [_row(mine[i], phase, train_split, eval_split, result, world.rank) for i, result in zip(stack, results)]
        append_rows(out / "ranks" / f"rank-{world.rank}.jsonl", stack_rows)
        rows += stack_rows
    if pending:
        score(cache, [result for _, result in pending], eval_split, device, loaded, ordered[0].batch_size)
        stack_rows = [_row(mine[i], phase, train_split, eval_split, result, world.rank) for i, result in pending]
        append_rows(out / "ranks" / f"rank-{world.rank}.jsonl", stack_rows)
        rows += stack_rows
    if board is not None:
        for row in rows:
            board.result(f"{phase}-{row.config_id}", row.config, row.top1,
                         {"phase": phase, "train_split": train_split, "eval_split": eval_split})
    trained = [row for rank_rows in world.all_gather(rows) for row in rank_rows]
    return sorted([*done.values(), *trained], key=lambda row: row.config_id)


def sweep_dir(out: str | Path | None, source: str | Path, world: World) -> Path:
    """`out`, or runs/<source name>-sweep-<timestamp>, the same folder on every rank."""
    return Path(world.broadcast(str(out) if out is not None else str(runs.default_run_dir(source, "sweep"))))


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
    max_stack: int | None = None,
    memory_budget: int | None = None,
    compile: bool = False,
    fused: bool = False,
    cuda_graphs: bool | None = None,
    tensorboard: bool = False,
    halving: Halving | None = None,
    on_stack: StackCallback | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    live_progress: ProgressSink | None = None,
) -> SweepReport:
    """Train every configuration and write results.jsonl, results.csv and sweep.png to `out`.

    protocol 'vtab' (the default when the cache has the VTAB-1k splits): select on
    train800 -> val200, retrain the top-k on train800val200, report on test. 'none': train on
    one split and score on another (defaults as for `train`). Stacks hold as many configs as
    fit the device's memory, at most `max_stack` (default: 16 on the CPU, unbounded on a GPU).

    Every finished stack is journaled to ranks/rank-R.jsonl: rerun an interrupted sweep with
    the same `out` and it trains only what is missing. Under torchrun each rank trains its share
    of the configs and keeps its own journal; rank 0 writes the merged files. Every rank
    returns the merged report. `tensorboard` writes TensorBoard event files to
    `out`/tensorboard: per configuration and phase, scalars per epoch and an HParams entry.
    `halving` prunes each stack by successive halving while it selects (sidetune/halving.py);
    the final retraining of the top-k runs in full. `live_progress` hears a live test split's
    pass through the backbone."""
    started = time.perf_counter()
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
    world = current_world(torch_device)
    torch_device = world.device(torch_device)
    out = sweep_dir(out, cache.path, world)
    out.mkdir(parents=True, exist_ok=True)
    # one load of each split for every stack and phase; a live split's pass heard by live_progress
    loaded = LoadedSplits(cache, torch_device, memory_budget, progress=live_progress)
    board = TensorBoardLog(out / "tensorboard") if tensorboard else None
    common = dict(out=out, world=world, device=torch_device, max_stack=max_stack, memory_budget=memory_budget, compile=compile, fused=fused,
                  cuda_graphs=cuda_graphs, loaded=loaded, board=board, halving=halving, on_stack=on_stack, on_epoch=on_epoch)

    if protocol == "vtab":
        rows = run_configs(cache, dict(enumerate(configs)), "select", "train800", "val200", **common)
        ranked = sorted((row for row in rows if row.status == "ok"), key=lambda row: -row.top1)
        if not ranked:
            raise SidetuneError("Every configuration diverged during selection; lower the learning rates.")
        chosen = {row.config_id: configs[row.config_id] for row in ranked[:top_k]}
        final_rows = run_configs(cache, chosen, "final", "train800val200", "test", **common)
        rows += final_rows
        best = max((row for row in final_rows if row.status == "ok"), key=lambda row: row.top1, default=final_rows[0])
    else:
        train_split, eval_split = default_splits(cache, train_split, eval_split)
        rows = run_configs(cache, dict(enumerate(configs)), "single", train_split, eval_split, **common)
        ok = [row for row in rows if row.status == "ok"]
        if not ok:
            raise SidetuneError("Every configuration diverged; lower the learning rates.")
        best = max(ok, key=lambda row: row.top1)

    if board is not None:
        board.close()
    report = SweepReport(out, rows, best, protocol, time.perf_counter() - started)
    if world.is_main:
        write_results(report, cache, configs[0].method, top_k, world.size)
    world.barrier()
    return report


def _row(config_id: int, phase: str, train_split: str, eval_split: str, result: TrainResult, rank: int) -> SweepRow:
    return SweepRow(config_id, phase, train_split, eval_split, result.status, result.top1, result.seconds,
                    result.params, result.config, result.failure, rank, len(result.history))


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
        "cache": str(cache.path), "protocol": report.protocol, "top_k": top_k, "ranks": world_size,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "seconds": round(report.seconds, 3),
        "configurations": len({row.config_id for row in rows}), "best": report.best.record(), "train_command": train_command(cache.path, report.best.config)})
    scored = [row for row in rows if row.phase in ("select", "single")]
    plot_sweep([row.record() for row in scored], out / "sweep.png",
               f"{cache.manifest['dataset']['name']}: {method}, {scored[0].eval_split} top-1")


def write_rows(path: Path, rows: list[SweepRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row.record(), default=_plain) + "\n" for row in rows))


def _plain(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def train_command(cache_path: str | Path, config: TrainConfig) -> str:
    """The `sidetune train` command line that trains `config` alone."""
    flags = {"method": config.method, "epochs": config.epochs, "lr": config.lr, "wd": config.weight_decay,
             "warmup-epochs": config.warmup_epochs, "batch-size": config.batch_size,
             "label-smoothing": config.label_smoothing, "seed": config.seed, "data-seed": config.data_seed}
    if config.augment != "none":
        flags.update({"augment": config.augment, "augment-magnitude": config.augment_magnitude})
    parts = ["sidetune", "train", "--cache", str(cache_path)]
    parts += [f"--{name} {value}" for name, value in flags.items()]
    for name, value in config.options:
        if name == "zero_init_out":
            continue  # not a CLI option; the default (True) is the only value the CLI trains
        flag = name.replace("_", "-")
        parts.append((f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}")
    return " ".join(parts)
