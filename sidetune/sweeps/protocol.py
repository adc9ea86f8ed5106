"""Sweeps: many side-network configurations trained from one cache in one process.

    sidetune sweep --cache ./cache/dtd --method last --lr 3e-4,1e-3,3e-3 --wd 1e-4,1e-3 --rank 8,16

Configs that share a group key (same method, options, epochs, batch size, batch order) are
stacked and trained together by the engine, sharing every batch; different shapes form separate
groups, each checked against the cache once, and a group is cut into stacks that fit the
device's memory (sidetune/training/stacking.py). Under torchrun the configs are shared out
between the ranks. Under the validation protocol (VTAB-1k's, by split roles) every config
trains on the training split and is scored on the validation split; the best (top-k) is
retrained on train and validation together and reported on test. Selection never sees test;
selecting on test happens only when asked for (protocol none with test as the evaluation split)
and the report says so."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from sidetune import runs
from sidetune.cache.reader import Cache, open_cache
from sidetune.compute import resolve_device
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
    # every group's stages held at once: groups reading different stages (linear --blocks 1 and 4) share one load
    loaded.hold(sorted({stage for blueprint in blueprints.values() for stage in blueprint.stages}))
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


PROTOCOLS = ("auto", "val", "none")
PROTOCOL_ALIASES = {"vtab": "val"}  # its name before it ran by roles on any dataset


@dataclass(frozen=True)
class Protocol:
    """How a sweep trains, selects and reports, as the cache's split names. `val`: every
    configuration trains on `train` and is ranked on `select` (the validation split); the top-k
    are retrained on `final_train` (train and validation) and reported on `report` (test).
    `none`: one phase, trained on `train`, ranked and reported on `select`."""

    name: str
    train: str
    select: str
    final_train: str | None = None
    report: str | None = None
    selected_on_test: bool = False

    @property
    def reported(self) -> str:
        """The split of the reported top-1."""
        return self.report or self.select

    def describe(self) -> str:
        if self.name == "val":
            return (f"selected on {self.select} (trained on {self.train}), the best retrained on {self.final_train} "
                    f"and reported on {self.report}")
        text = f"trained on {self.train}, selected and reported on {self.select}"
        if self.selected_on_test:
            text += (": SELECTED ON TEST, so the best top-1 is an optimistic estimate, not a held-out score (the "
                     "default protocol selects on the validation split)")
        return text


def resolve_protocol(cache: Cache, protocol: str = "auto", train_split: str | None = None,
                     eval_split: str | None = None) -> Protocol:
    """The protocol a sweep runs on `cache`, from the cache's split roles (sidetune/roles.py).
    `auto`: the validation protocol wherever the cache has train, validation, train+validation
    and test splits and no split was named; with a split named, protocol none on the splits
    given (defaults as for `train`). A cache without a validation split is refused rather than
    selected on test; protocol none on test is allowed when asked for, and said."""
    protocol = PROTOCOL_ALIASES.get(protocol, protocol)
    if protocol not in PROTOCOLS:
        raise SidetuneError(f"Unknown protocol '{protocol}'; choose val (select on the validation split, retrain, "
                            "report test), none (one training split, one evaluation split) or auto.")
    roles = cache.info.roles
    named = train_split is not None or eval_split is not None
    if protocol == "auto":
        if named or (roles.val is not None and roles.test is None):
            protocol = "none"
        elif roles.can_select:
            protocol = "val"
        else:
            raise SidetuneError(
                f"Cache {cache.path} has no validation split to select on (its splits: {', '.join(cache.splits)}; "
                f"roles: {roles.describe()}), and a sweep does not select on test unless asked. Extract a validation "
                "split into it (`sidetune extract` carves a seeded, stratified one from the training split unless "
                "--splits leaves it out; a cache written before it did needs --overwrite), or pass --protocol none "
                "to select on the test split knowingly (the results then say so).")
    if protocol == "val":
        if named:
            raise SidetuneError("--train-split and --eval-split choose the splits of --protocol none; the validation "
                                f"protocol uses the cache's roles ({roles.describe()}). Drop them, or pass --protocol none.")
        if not roles.can_select:
            missing = [role for role in ("train", "val", "trainval", "test") if getattr(roles, role) is None]
            raise SidetuneError(
                f"--protocol val needs splits in the roles train, val, trainval and test; cache {cache.path} has none "
                f"for {', '.join(missing)} (its splits: {', '.join(cache.splits)}). Extract the missing splits into it "
                "(`sidetune extract` carves a validation split from train unless --splits leaves it out; a cache "
                "written before it did needs --overwrite), or use --protocol none.")
        return Protocol("val", roles.train, roles.val, roles.trainval, roles.test)
    train_split, eval_split = default_splits(cache, train_split, eval_split)
    return Protocol("none", train_split, eval_split, selected_on_test=eval_split == roles.test)


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

    protocol 'val' (the default where the cache has train, validation and test splits: VTAB-1k's
    protocol, by split roles): select on the training -> validation split, retrain the top-k on
    both together, report on test. 'none': train on one split and rank on another (defaults as
    for `train`; on test only when asked for, and the report says so). `resolve_protocol` says
    which. Stacks hold as many configs as fit the device's memory, at most `max_stack`
    (default: 16 on the CPU, unbounded on a GPU).

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
    chosen_protocol = resolve_protocol(cache, protocol, train_split, eval_split)
    torch_device = resolve_device(device)
    world = current_world(torch_device)
    torch_device = world.device(torch_device)
    out = sweep_dir(out, cache.path, world)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        held.enter_context(runs.disk_full_said(out, "Every finished stack's results are journaled in ranks/."))
        if world.is_main:  # one sweep per folder
            held.enter_context(runs.writing(out, "sidetune sweep"))
        # one load of each split for every stack and phase; a live split's pass heard by live_progress
        loaded = LoadedSplits(cache, torch_device, memory_budget, progress=live_progress)
        board = TensorBoardLog(out / "tensorboard") if tensorboard else None
        common = dict(out=out, world=world, device=torch_device, max_stack=max_stack, memory_budget=memory_budget, compile=compile, fused=fused,
                      cuda_graphs=cuda_graphs, loaded=loaded, board=board, halving=halving, on_stack=on_stack, on_epoch=on_epoch)
        train_split, select_split = chosen_protocol.train, chosen_protocol.select
        seen = cache.shared_images(train_split, select_split)  # 0 under the val protocol unless the splits were made so

        try:
            if chosen_protocol.name == "val":
                rows = run_configs(cache, dict(enumerate(configs)), "select", train_split, select_split, **common)
                ranked = sorted((row for row in rows if row.status == "ok"), key=lambda row: -row.top1)
                if not ranked:
                    raise SidetuneError("Every configuration diverged during selection; lower the learning rates.")
                chosen = {row.config_id: configs[row.config_id] for row in ranked[:top_k]}
                final_rows = run_configs(cache, chosen, "final", chosen_protocol.final_train, chosen_protocol.report,
                                         keep_models=True, **common)
                rows += final_rows
                best = max((row for row in final_rows if row.status == "ok"), key=lambda row: row.top1, default=final_rows[0])
                world.barrier()
                models = kept_models(out, list(chosen))
            else:
                trained: dict[int, TrainResult] = {}
                rows = run_configs(cache, dict(enumerate(configs)), "single", train_split, select_split, kept=trained, **common)
                ok = [row for row in rows if row.status == "ok"]
                if not ok:
                    raise SidetuneError("Every configuration diverged; lower the learning rates.")
                best = max(ok, key=lambda row: row.top1)
                top = [row.config_id for row in sorted(ok, key=lambda row: -row.top1)[:top_k]]
                for config_id in top:  # each rank keeps those it trained; one trained by an earlier, interrupted run is not kept
                    if config_id in trained:
                        keep_model(out, cache, config_id, trained[config_id], train_split, select_split, torch_device)
                world.barrier()
                models = kept_models(out, top)
        except KeyboardInterrupt:
            journaled = sum(len(path.read_text().splitlines()) for path in (out / "ranks").glob("rank-*.jsonl"))
            raise Interrupted(f"Sweep interrupted: {journaled} finished configuration rows are journaled in {out}/ranks; "
                              f"rerun the same command with --out {out} to train only the rest.") from None

        if board is not None:
            board.close()
        report = SweepReport(out, rows, best, chosen_protocol, time.perf_counter() - started, seen, models)
        if world.is_main:
            write_results(report, cache, configs[0].method, top_k, world.size)
        world.barrier()
        return report
