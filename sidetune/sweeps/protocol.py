"""Sweeps: many side-network configurations trained from one cache in one process.

    sidetune sweep --cache ./cache/dtd --method last --lr 3e-4,1e-3,3e-3 --wd 1e-4,1e-3 --rank 8,16

Configs that share a group key (same method, options, epochs, batch size, batch order) are
stacked and trained together by the engine, sharing every batch; different shapes form separate
groups, each checked against the cache once, and a group is cut into stacks that fit the
device's memory (sidetune/training/stacking.py). Under torchrun the configs are shared out
between the ranks. With the VTAB-1k protocol every config trains on train800 and is scored on
val200; the best (top-k) is retrained on train800val200 and reported on test. Selection never
sees test."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from sidetune import runs
from sidetune.cache.reader import Cache, open_cache
from sidetune.compute import resolve_device
from sidetune.datasets.catalogue import VTAB_SPLITS
from sidetune.distributed import World, current_world
from sidetune.errors import Interrupted, SidetuneError
from sidetune.sweeps.halving import Halving, train_with_halving
from sidetune.sweeps.journal import SweepRow, append_rows, finished_rows, result_row
from sidetune.sweeps.report import SweepReport, write_results
from sidetune.tensorboard_log import TensorBoardLog
from sidetune.train import default_splits, finish_run, run_record
from sidetune.training import EpochStats, TrainConfig, TrainResult, score, sidenet_blueprint, train_group
from sidetune.training.build import config_for_cache
from sidetune.training.data import LoadedSplits
from sidetune.training.stacking import default_stack_limit, plan_stacks, stack_capacity

if TYPE_CHECKING:  # stage two never imports the backbone code at run time
    from sidetune.progress import ProgressSink

StackCallback = Callable[[int, int, list[TrainConfig]], None]  # (stack number, stacks, its configs)


def run_configs(cache: Cache, configs: dict[int, TrainConfig], phase: str, train_split: str, eval_split: str, *,
                out: Path, world: World, device: torch.device, max_stack: int | None, memory_budget: int | None, compile: bool, fused: bool,
                cuda_graphs: bool | None, loaded: LoadedSplits, board: TensorBoardLog | None, halving: Halving | None,
                on_stack: StackCallback | None, on_epoch: Callable[[EpochStats], None] | None,
                keep_models: bool = False, kept: dict[int, TrainResult] | None = None) -> list[SweepRow]:
    """Train configs (keyed by config id) and return every config's row, ordered by id, on
    every rank. Configs an interrupted run of this sweep finished are not trained again. Each
    group of same-shape configs is shared out between the ranks, and each rank's share is cut
    into stacks that fit its device's memory (and `max_stack`); every finished stack is
    journaled to ranks/rank-R.jsonl. `loaded` holds the splits' features for every stack and
    both phases (views share their stored split's). With `keep_models` every trained
    configuration's model is written as it finishes (`keep_model`); `kept` collects this rank's
    results instead, for the caller to keep some."""
    done = world.broadcast(finished_rows(out, phase, configs, train_split, eval_split) if world.is_main else None)
    groups: dict[tuple, list[int]] = {}
    for config_id, config in configs.items():
        if config_id not in done:
            groups.setdefault(config.group_key(), []).append(config_id)
    shares = {key: share for key, members in groups.items() if (share := world.share(members))}
    mine = [config_id for share in shares.values() for config_id in share]
    limit = max_stack or default_stack_limit(device)
    capacity, blueprints = {}, {}
    for key, share in shares.items():  # checked and measured only for the groups this rank trains
        first = configs[share[0]]
        blueprints[key] = sidenet_blueprint(cache, first.method, dict(first.options))
        fit = stack_capacity(cache, blueprints[key], first, train_split, eval_split, device, memory_budget=memory_budget)
        capacity[key] = min(fit, limit) if limit else fit
    ordered = [configs[config_id] for config_id in mine]
    live = cache.split(eval_split).kind == "live"  # scored once for every stack, below: one backbone pass
    rows, pending = [], []
    stacks = plan_stacks(ordered, capacity)

    def record_stack(finished: list[tuple[int, TrainResult]]) -> list[SweepRow]:
        for config_id, result in finished:  # the models first: a journaled final row has its model
            if result.status == "ok" and keep_models:
                keep_model(out, cache, config_id, result, train_split, eval_split, device)
            elif result.status == "ok" and kept is not None:
                kept[config_id] = result
        stack_rows = [result_row(config_id, phase, train_split, eval_split, result, world.rank)
                      for config_id, result in finished]
        append_rows(out / "ranks" / f"rank-{world.rank}.jsonl", stack_rows)
        return stack_rows
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
        options = dict(memory_budget=memory_budget, compile=compile, fused=fused, cuda_graphs=cuda_graphs, loaded=loaded,
                       blueprint=blueprints[ordered[stack[0]].group_key()])
        if halving is not None and phase != "final":
            results = train_with_halving(cache, [ordered[i] for i in stack], train_split, eval_split, device, halving,
                                         on_epoch_of=lambda alive, stack=stack: logged([stack[i] for i in alive]), **options)
        else:
            results = train_group(cache, [ordered[i] for i in stack], train_split, eval_split, device,
                                  on_epoch=logged(stack), evaluate=not live, **options)
        if live:
            pending += zip(stack, results)
            continue
        finished = [(mine[i], result) for i, result in zip(stack, results)]
        rows += record_stack(finished)
    if pending:
        score(cache, [result for _, result in pending], eval_split, device, loaded, ordered[0].batch_size)
        rows += record_stack([(mine[i], result) for i, result in pending])
    if board is not None:
        for row in rows:
            board.result(f"{phase}-{row.config_id}", row.config, row.top1,
                         {"phase": phase, "train_split": train_split, "eval_split": eval_split})
    trained = [row for rank_rows in world.all_gather(rows) for row in rank_rows]
    return sorted([*done.values(), *trained], key=lambda row: row.config_id)


def keep_model(out: Path, cache: Cache, config_id: int, result: TrainResult, train_split: str, eval_split: str,
               device: torch.device) -> Path:
    """A trained configuration as a run directory of its own, out/models/config-<id>, with the
    files `sidetune train` writes: `evaluate --run` and `predict --run` work on it."""
    folder = out / "models" / f"config-{config_id}"
    folder.mkdir(parents=True, exist_ok=True)
    runs.write_json(folder / runs.CONFIG_FILE, run_record(cache, result.config, train_split, eval_split, device.type))
    finish_run(folder, cache, result.config, result, train_split, eval_split, device.type)
    return folder


def kept_models(out: Path, config_ids: list[int]) -> dict[int, str]:
    """The finished model folders of these configurations, by config id."""
    folders = {config_id: out / "models" / f"config-{config_id}" for config_id in config_ids}
    return {config_id: str(folder) for config_id, folder in folders.items() if (folder / runs.METRICS_FILE).is_file()}


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
    `halving` prunes each stack by successive halving while it selects (sidetune/sweeps/halving.py);
    the final retraining of the top-k runs in full. `live_progress` hears a live test split's
    pass through the backbone."""
    started = time.perf_counter()
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if not configs:
        raise SidetuneError("The sweep has no configurations; give at least one value for each setting.")
    configs = [config_for_cache(config, cache) for config in configs]  # e.g. pool auto, decided and recorded
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

    try:
        if protocol == "vtab":
            seen = cache.shared_images("train800", "val200")  # 0 unless the cache's splits were made otherwise
            rows = run_configs(cache, dict(enumerate(configs)), "select", "train800", "val200", **common)
            ranked = sorted((row for row in rows if row.status == "ok"), key=lambda row: -row.top1)
            if not ranked:
                raise SidetuneError("Every configuration diverged during selection; lower the learning rates.")
            chosen = {row.config_id: configs[row.config_id] for row in ranked[:top_k]}
            final_rows = run_configs(cache, chosen, "final", "train800val200", "test", keep_models=True, **common)
            rows += final_rows
            best = max((row for row in final_rows if row.status == "ok"), key=lambda row: row.top1, default=final_rows[0])
            world.barrier()
            models = kept_models(out, list(chosen))
        else:
            train_split, eval_split = default_splits(cache, train_split, eval_split)
            seen = cache.shared_images(train_split, eval_split)
            trained: dict[int, TrainResult] = {}
            rows = run_configs(cache, dict(enumerate(configs)), "single", train_split, eval_split, kept=trained, **common)
            ok = [row for row in rows if row.status == "ok"]
            if not ok:
                raise SidetuneError("Every configuration diverged; lower the learning rates.")
            best = max(ok, key=lambda row: row.top1)
            top = [row.config_id for row in sorted(ok, key=lambda row: -row.top1)[:top_k]]
            for config_id in top:  # each rank keeps those it trained; one trained by an earlier, interrupted run is not kept
                if config_id in trained:
                    keep_model(out, cache, config_id, trained[config_id], train_split, eval_split, torch_device)
            world.barrier()
            models = kept_models(out, top)
    except KeyboardInterrupt:
        journaled = sum(len(path.read_text().splitlines()) for path in (out / "ranks").glob("rank-*.jsonl"))
        raise Interrupted(f"Sweep interrupted: {journaled} finished configuration rows are journaled in {out}/ranks; "
                          f"rerun the same command with --out {out} to train only the rest.") from None

    if board is not None:
        board.close()
    report = SweepReport(out, rows, best, protocol, time.perf_counter() - started, seen, models)
    if world.is_main:
        write_results(report, cache, configs[0].method, top_k, world.size)
    world.barrier()
    return report
