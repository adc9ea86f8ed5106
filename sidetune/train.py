"""The `train` recipe: one side-network configuration from a cache into a run directory.

    import sidetune
    from sidetune.training import TrainConfig
    run_dir, result = sidetune.train("cache/dtd", TrainConfig.create("last", {"rank": 16}))

It is the training loop with K = 1 plus the files of a run (sidetune/runs.py). Like all of stage
two it never imports timm or the backbone."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sidetune import runs
from sidetune.cache.reader import Cache, open_cache
from sidetune.compute import resolve_device
from sidetune.distributed import launched_world_size
from sidetune.errors import Interrupted, SidetuneError
from sidetune.replacing import recover, staging_path, swap_in
from sidetune.results import plot_learning_curve, plot_penalty_path
from sidetune.sidenets import SIDENETS
from sidetune.tensorboard_log import TensorBoardLog
from sidetune.training import EpochStats, GroupState, TrainConfig, TrainResult, train_group
from sidetune.training.build import config_for_cache
from sidetune.training.data import LoadedSplits
from sidetune.training.scoring import seen_warning

if TYPE_CHECKING:  # stage two never imports the backbone code at run time
    from sidetune.progress import ProgressSink

def default_splits(cache: Cache, train_split: str | None = None, eval_split: str | None = None) -> tuple[str, str]:
    """By the cache's split roles: the final model's training split (train and validation
    together: train800val200, trainval; else train) -> test; without a test split, train ->
    validation. An explicit split wins. A missing split is refused, listing those present."""
    present = list(cache.splits)
    roles = cache.info.roles
    default = (roles.final_training, roles.test) if roles.test else (roles.train, roles.val)
    chosen = (train_split or default[0], eval_split or default[1])
    for role, split, option in (("training", chosen[0], "--train-split"), ("evaluation", chosen[1], "--eval-split")):
        if split is None:
            raise SidetuneError(f"Cache {cache.path} has no {role} split by default (its splits: {', '.join(present)}; "
                                f"roles: {roles.describe()}). Pass {option} with one of those.")
        if split not in present:
            raise SidetuneError(f"Cache {cache.path} has no {role} split '{split}'; it has {', '.join(present)}. "
                                f"Pass {option} with one of those (or extract the split with --splits).")
    return chosen


def train(
    cache: str | Path | Cache,
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    device: str = "auto",
    eval_every: int = 0,
    memory_budget: int | None = None,
    compile: bool = False,
    fused: bool = False,
    cuda_graphs: bool | None = None,
    tensorboard: bool = False,
    overwrite: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    live_progress: ProgressSink | None = None,
    log: Callable[[str], None] = lambda message: None,
    warn: Callable[[str], None] = lambda message: None,
    checkpoint_seconds: float | None = None,
) -> tuple[Path, TrainResult]:
    """Train one configuration and write its run directory; an interrupted run in `out` with
    the same settings resumes from its last checkpoint. `tensorboard` also writes TensorBoard
    event files (scalars per epoch, the HParams entry) to `out`/tensorboard. `live_progress`
    hears a live evaluation split's pass through the backbone. `warn` hears, before training,
    that the evaluation split holds images of the training split (its top-1 then is not a
    held-out score; metrics.json records how many). A checkpoint is written at every epoch end
    (at most one every `checkpoint_seconds`, when given), so Ctrl-C loses at most the epoch in
    progress; it raises `Interrupted`, saying what was kept. Returns (run directory, result)."""
    if launched_world_size() > 1:
        raise SidetuneError("`sidetune train` trains one configuration in one process; under torchrun every rank "
                            "would write the same run. Run it without torchrun, or share configurations between "
                            "ranks with `torchrun ... -m sidetune sweep`.")
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    config = config_for_cache(config, cache)  # e.g. pool auto, decided and recorded
    train_split, eval_split = default_splits(cache, train_split, eval_split)
    closed_form = SIDENETS[config.method].closed_form
    path_configs = penalty_path(config) if closed_form else []
    if path_configs:
        log(f"{config.method} is solved in closed form for its L2 strength (--wd {config.weight_decay}): no epochs, so "
            f"--epochs and the learning rate do not apply. The same solve gives {len(path_configs)} other strengths, "
            f"and curve.png plots {eval_split} top-1 against them (to choose λ on a held-out split, `sidetune sweep "
            f"--method {config.method}` selects on the validation split)")
    elif closed_form:
        log(f"{config.method} takes no training steps, so --epochs, the learning rate and the weight decay do not apply")
    seen = cache.shared_images(train_split, eval_split)
    if seen:
        warn(seen_warning(cache, train_split, eval_split, seen))
    num_images = cache.split(train_split).num_images
    if config.batch_size > num_images:
        warn(f"--batch-size {config.batch_size} is larger than the training split {train_split} ({num_images} images): "
             "each step takes the whole split, once per epoch.")
    torch_device = resolve_device(device)
    out = Path(out) if out is not None else runs.default_run_dir(cache.path, config.method)
    recover(out)  # a replacement's swap that a crash cut short
    # --overwrite of a run builds the new one beside it and swaps it in when it is finished
    staged = overwrite and (out / runs.CONFIG_FILE).is_file()
    run_dir = staging_path(out) if staged else out
    with contextlib.ExitStack() as locks:  # one writer per run folder (and per replacement)
        locks.enter_context(runs.disk_full_said(out, "The checkpoint of the last finished epoch is kept."))
        for folder in dict.fromkeys([out, run_dir]):
            locks.enter_context(runs.writing(folder, "sidetune train"))
        record = run_record(cache, config, train_split, eval_split, torch_device.type, eval_every)
        resume = None
        if runs.prepare_run_dir(run_dir, record, replace_other=staged):
            checkpoint_path = run_dir / runs.CHECKPOINT_FILE
            try:
                resume = GroupState.from_record(runs.load_checkpoint(checkpoint_path))
            except (KeyError, TypeError, ValueError, AttributeError) as error:  # read, but not a checkpoint's record
                raise runs.damaged_checkpoint(checkpoint_path, error) from None
            log(f"resuming {run_dir} from epoch {resume.epoch} of {config.epochs}")
        _rewrite_log(run_dir, resume)

        board = TensorBoardLog(run_dir / "tensorboard") if tensorboard else None

        def epoch_done(stats: EpochStats) -> None:
            with open(run_dir / runs.LOG_FILE, "a") as handle:
                handle.write(json.dumps(stats.row(0)) + "\n")
            if board is not None:
                board.epoch(["."], [config], stats, num_images)
            if on_epoch is not None:
                on_epoch(stats)

        last_saved, saved_epoch = time.monotonic(), resume.epoch if resume is not None else 0

        def checkpoint(state: GroupState) -> None:
            nonlocal last_saved, saved_epoch
            if state.epoch < config.epochs and time.monotonic() - last_saved >= (checkpoint_seconds or 0.0):
                runs.save_checkpoint(run_dir / runs.CHECKPOINT_FILE, state.to_record())
                last_saved, saved_epoch = time.monotonic(), state.epoch

        try:
            result, *path_results = train_group(
                cache, [config, *path_configs], train_split, eval_split, torch_device, eval_every=eval_every,
                on_start=on_start, on_epoch=epoch_done, resume=resume, checkpoint=checkpoint, compile=compile, fused=fused,
                cuda_graphs=cuda_graphs, loaded=LoadedSplits(cache, torch_device, memory_budget, progress=live_progress))
        except KeyboardInterrupt:
            kept = (f"epochs 1-{saved_epoch} of {config.epochs} are kept in {run_dir / runs.CHECKPOINT_FILE}; rerun the "
                    f"same command (with --out {out}) to resume from epoch {saved_epoch + 1}") if saved_epoch else (
                    f"no epoch had finished, so nothing was kept; rerun the same command (with --out {out}) to start again")
            if staged:
                kept += f" (the run at {out} stays as it was until the new one is finished)"
            raise Interrupted(f"Training interrupted: {kept}.") from None
        if board is not None:
            board.result(".", config, result.top1, {"train_split": train_split, "eval_split": eval_split})
            board.close()
        if result.status != "ok":
            raise SidetuneError(f"Training diverged: {result.failure}. Lower --lr (now {config.lr}) and rerun with --overwrite.")
        path = [(r.config.weight_decay, r.top1) for r in (result, *path_results) if r.status == "ok"] if path_configs else None
        finish_run(run_dir, cache, config, result, train_split, eval_split, torch_device.type, penalty_path=path)
        (run_dir / runs.CHECKPOINT_FILE).unlink(missing_ok=True)
        if staged:
            swap_in(out)
    return out, result


def penalty_path(config: TrainConfig) -> list[TrainConfig]:
    """A closed-form configuration at the other L2 strengths of its method's default grid:
    solved with it from one decomposition, for the plot of top-1 against λ."""
    strengths = SIDENETS[config.method].default_grid.get("weight_decay", [])
    return [replace(config, weight_decay=strength) for strength in strengths if strength != config.weight_decay]


def run_record(cache: Cache, config: TrainConfig, train_split: str, eval_split: str, device: str,
               eval_every: int = 0) -> dict:
    """config.json: the configuration, its splits and the cache's manifest (without its splits)."""
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cache": str(cache.path), "train_split": train_split, "eval_split": eval_split,
        "eval_every": eval_every, "device": device, "config": config.describe(),
        "cache_manifest": {k: v for k, v in cache.manifest.items() if k != "splits"},
    }


def finish_run(out: Path, cache: Cache, config: TrainConfig, result: TrainResult, train_split: str, eval_split: str,
               device: str, penalty_path: list[tuple[float, float]] | None = None) -> None:
    """A trained configuration's files in its run directory (beside config.json): its state
    (and best state), its learning curve (a closed form: `penalty_path`, top-1 against λ, when
    given), and last metrics.json, which marks the run finished (so `evaluate`, `predict` and
    `runs` read it)."""
    runs.save_state(out / runs.MODEL_FILE, result.state)
    if result.best_state is not None:
        runs.save_state(out / runs.BEST_FILE, result.best_state)
    title = f"{cache.info.dataset_name}: {config.method}, {train_split} -> {eval_split}"
    if not SIDENETS[config.method].closed_form:
        plot_learning_curve(result.history, out / runs.CURVE_FILE, title, eval_split)
    elif penalty_path:
        plot_penalty_path(penalty_path, config.weight_decay, out / runs.CURVE_FILE, title, eval_split)
    extra = {} if penalty_path is None else {"penalty_path": [{"weight_decay": wd, "top1": top1} for wd, top1 in sorted(penalty_path)]}
    runs.write_json(out / runs.METRICS_FILE, {**metrics_record(cache, config, result, train_split, eval_split, device),
                                             "eval_images_seen_in_training": cache.shared_images(train_split, eval_split),
                                             **extra})


def metrics_record(cache: Cache, config: TrainConfig, result: TrainResult, train_split: str, eval_split: str,
                   device: str) -> dict:
    """metrics.json: the result, and every hyperparameter flat beside it."""
    class_names = cache.class_names
    return {
        "method": config.method,
        "status": result.status,
        "top1": result.top1,
        "eval_split": eval_split,
        "train_split": train_split,
        "params": result.params,
        "seconds": round(result.seconds, 3),
        "seed": config.seed,
        "hyperparameters": config.hyperparameters(),
        **config.hyperparameters(),
        "epochs": None if SIDENETS[config.method].closed_form else config.epochs,  # a closed form has none
        "closed_form": SIDENETS[config.method].closed_form,
        "best_top1": result.best_top1,
        "best_epoch": result.best_epoch,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "per_class_top1": {name: None if math.isnan(value) else value
                           for name, value in zip(class_names, result.per_class or [])},
        "cache": str(cache.path),
        "dataset": cache.info.dataset_name,
        "backbone": cache.info.backbone_name,
        "device": device,
    }


def _rewrite_log(out: Path, resume: GroupState | None) -> None:
    """log.jsonl holds exactly the epochs behind the state training continues from."""
    rows = [stats.row(0) for stats in resume.history] if resume is not None else []
    (out / runs.LOG_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
