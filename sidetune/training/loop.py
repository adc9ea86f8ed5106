"""Stage two: train K stacked side-network configurations from the cache in one loop.

A split's features are loaded into device memory once when they fit the memory budget
(otherwise streamed by whole shards with prefetch, sidetune/training/data.py); batches are
gathered on the device.
All K configurations share every batch. Per-config learning rate and weight decay are
tensors; losses are summed over configs (never averaged across them), there is no gradient
clipping, and a configuration that goes non-finite is frozen and reported while the others
continue. `train` of one configuration is this loop with K = 1."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from sidetune.cache.reader import Cache
from sidetune.errors import SidetuneError
from sidetune.kernels import check_fused
from sidetune.training.augment import BrightnessAugmentation, augmentation_generator
from sidetune.training.build import SideNetBlueprint, sidenet_blueprint
from sidetune.training.config import TrainConfig, TrainResult
from sidetune.training.data import LoadedSplits
from sidetune.training.optim import StackedAdamW
from sidetune.training.scoring import accuracy, predicted_classes
from sidetune.training.state import Checkpointer, EpochStats, GroupState, restore_group
from sidetune.training.step import StackedStep


VIEW_DRAWS = 7_919  # offsets the seed of each epoch's view draws from its batch order's


def views_drawn(cache: Cache, train_split: str, config: TrainConfig) -> int:
    """How many of the training images' stored augmented views `config` draws from: all the cache
    has unless its `views` says fewer (0: none, the images as they are)."""
    split = cache.split(train_split)
    stored = split.stored.view_count if split.kind != "live" else 0
    wanted = stored if config.views is None else config.views
    if wanted > stored:
        raise SidetuneError(f"--views {wanted}, but the cache stores {stored} augmented views of {train_split}'s images. "
                            f"Extract them with `sidetune extract ... --views {wanted}` (and --overwrite), or draw "
                            f"from at most {stored}.")
    return wanted


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_group(cache: Cache, configs: list[TrainConfig], train_split: str, eval_split: str,
                device: str | torch.device = "cpu", *, eval_every: int = 0, memory_budget: int | None = None,
                on_epoch: Callable[[EpochStats], None] | None = None, resume: GroupState | None = None,
                checkpoint: Checkpointer | None = None, compile: bool = False, cuda_graphs: bool | None = None,
                fused: bool = False, loaded: LoadedSplits | None = None, evaluate: bool = True,
                until_epoch: int | None = None, blueprint: SideNetBlueprint | None = None,
                on_start: Callable[[int], None] | None = None) -> list[TrainResult]:
    """Train configs that share a group key, stacked along the leading axis, and evaluate
    them on `eval_split` after training (and every `eval_every` epochs, which also keeps the
    best state). `on_epoch` sees each epoch's stats; `checkpoint` receives the group's state
    after each epoch, and `resume` continues from such a state. `compile` runs the training
    forward through `torch.compile` (fused kernels; a one-off compile cost per shape).
    `cuda_graphs` captures each step (forward, backward, optimizer) in a CUDA graph and replays
    it: on by default on CUDA. `fused` runs the fused Triton kernels (sidetune/kernels/: LAST's and
    MIST's chain of modules, the optimizer) instead of their torch implementations. `loaded` shares the splits' features with other stacks (a sweep
    passes one to all its stacks). With `evaluate` False the final evaluation is left to the
    caller (`score`), whose results then have no top-1 yet. `until_epoch` stops after that
    epoch (the schedule stays that of the full run): with the state `checkpoint` received,
    `resume` continues it later, as successive halving does (sidetune/sweeps/halving.py).
    `blueprint` is the group's side network already checked against the cache (a sweep checks
    each group once); by default it is made here. `on_start` hears the epoch training starts
    from (0, or a resumed state's), once everything is checked and loaded and the first epoch
    begins; a closed-form method, which has no epochs, never calls it.

    Training reads only the cache. An evaluation split kept out of it (live) is scored through
    the backbone the cache records (sidetune/live.py).

    Nothing inside an epoch waits for the device: losses, accuracy and the failed-config mask
    stay on it and reach the host once per epoch."""
    keys = {c.group_key() for c in configs}
    if len(keys) != 1:
        raise ValueError("train_group needs configs with one group key; see TrainConfig.group_key")
    first = configs[0]
    device = torch.device(device)
    if cache.split(train_split).kind == "live":
        raise SidetuneError(f"Split {train_split} of {cache.path} is not in the cache (it is evaluated live, through "
                            "the backbone); training reads cached splits only. Train on another split, or extract "
                            f"{train_split} into the cache with --splits.")
    if eval_every and cache.split(eval_split).kind == "live":
        held_out = [name for name, split in cache.splits.items()
                    if split.kind != "live" and cache.shared_images(train_split, name) == 0]
        roles = cache.info.roles
        example = f" (e.g. --train-split {roles.train} --eval-split {roles.val})" if roles.train and roles.val else ""
        fix = (f"Evaluate during training on a cached split the training split does not contain (--eval-split "
               f"{held_out[0]})" if held_out else f"Train on a split that leaves cached images out{example}")
        raise SidetuneError(f"--eval-every would run the backbone over the live split {eval_split} every "
                            f"{eval_every} epochs. {fix}, or extract {eval_split} into the cache with --splits.")
    if fused:
        check_fused(device)
    started = time.perf_counter()
    blueprint = blueprint or sidenet_blueprint(cache, first.method, dict(first.options))
    net = blueprint.build(len(configs))
    net.set_stacked_options([dict(c.options) for c in configs])
    net.fused = fused
    net.reset_parameters([c.seed for c in configs])
    net.to(device)
    stages = net.stages_needed()
    loaded = loaded or LoadedSplits(cache, device, memory_budget)
    train_data = loaded.get(train_split, stages)
    views = views_drawn(cache, train_split, first)
    train_views = loaded.get_views(train_split, stages, views) if views and not net.closed_form else None
    eval_data = None
    if net.standardize:
        net.fit_standardizer(train_data.batches(256))
    augmentation = None
    if first.augment != "none" and first.augment_magnitude > 0:
        shapes = [net.layout.shape(stage) for stage in stages]
        augmentation = BrightnessAugmentation.fit(train_data.batches(256), shapes, net.layout.num_prefix_tokens,
                                                  first.augment_magnitude)

    k = len(configs)
    fingerprint = [c.describe() for c in configs]
    state = GroupState(0, {}, {}, torch.ones(k, dtype=torch.bool), {}, [], [None] * k, fingerprint)
    if net.closed_form:  # ridge, k-NN: every configuration solved at once; no optimizer, no epochs
        net.fit(train_data.batches(256), torch.tensor([c.weight_decay for c in configs]))
        state.epoch = first.epochs
    else:
        optimizer = StackedAdamW(net, torch.tensor([c.lr for c in configs]),
                                 torch.tensor([c.weight_decay for c in configs]), fused=fused)
        if resume is not None:
            state = restore_group(net, optimizer, state, resume)
        use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # a batch never holds more than the split: buffers for a --batch-size beyond it would be wasted (or unallocatable)
        step = StackedStep(net, optimizer, torch.tensor([c.label_smoothing for c in configs]),
                           min(first.batch_size, train_data.num_images), train_data.sample_shape, train_data.dtype,
                           compile=compile, cuda_graphs=use_graphs)
        step.active.copy_(state.active)
    num_images = train_data.num_images
    steps_per_epoch = math.ceil(num_images / first.batch_size)
    total_steps = steps_per_epoch * first.epochs
    warmup_steps = steps_per_epoch * first.warmup_epochs
    if on_start is not None and not net.closed_form:
        on_start(state.epoch)
    for epoch in range(state.epoch, until_epoch or first.epochs):
        epoch_started = time.perf_counter()
        number = epoch * steps_per_epoch
        step.start_epoch()
        shuffle = torch.Generator().manual_seed(first.data_seed * 100_003 + epoch)
        draws = augmentation_generator(first.data_seed, epoch, device) if augmentation else None
        if train_views is not None:  # one stored view per image this epoch, the same for every config of the stack
            train_views.choose_views(torch.Generator().manual_seed(first.data_seed * 100_003 + epoch + VIEW_DRAWS))
        net.train()
        batches_from = train_views if train_views is not None else train_data
        for tokens, labels in batches_from.batches(first.batch_size, shuffle, out=step.inputs):
            if augmentation is not None:
                tokens = augmentation(tokens, draws)
            step(tokens, labels, number + 1, lr_multiplier(number, total_steps, warmup_steps))
            number += 1
        totals = step.epoch_totals()  # the epoch's one wait for the device
        for j in range(k):
            if j not in state.failures and not totals.active[j]:
                at = int(totals.failed_step[j])
                state.failures[j] = (f"loss became {totals.failed_loss[j].item()} at epoch "
                                     f"{(at - 1) // steps_per_epoch + 1}, step {at}")
        state.active = totals.active
        eval_top1 = None
        if eval_every and ((epoch + 1) % eval_every == 0 or epoch + 1 == first.epochs):
            eval_data = eval_data or loaded.get(eval_split, stages)
            predictions, eval_labels = predicted_classes(net, eval_data, first.batch_size)
            eval_top1 = [math.nan if j in state.failures else float((predictions[j] == eval_labels).float().mean() * 100)
                         for j in range(k)]
            for j, top1 in enumerate(eval_top1):
                if j not in state.failures and (state.best[j] is None or top1 > state.best[j][0]):
                    state.best[j] = (top1, epoch + 1, net.config_state(j))
        mean_loss = torch.where(totals.active, totals.loss_sum / num_images, torch.full((k,), math.nan))
        stats = EpochStats(epoch + 1, mean_loss.tolist(), (totals.correct / num_images * 100).tolist(), eval_top1,
                           time.perf_counter() - started, num_images * k / (time.perf_counter() - epoch_started))
        state.history.append(stats)
        state.epoch = epoch + 1
        if checkpoint is not None:
            state.parameters = {name: p.detach().clone() for name, p in net.named_parameters()}
            state.moments = optimizer.moments()
            checkpoint(state)
        if on_epoch is not None:
            on_epoch(stats)

    if evaluate:
        eval_data = eval_data or loaded.get(eval_split, stages)
        predictions, eval_labels = predicted_classes(net, eval_data, first.batch_size)
    seconds = time.perf_counter() - started
    params = net.trainable_parameters_per_config()
    results = []
    for j, config in enumerate(configs):
        history = [stats.row(j) for stats in state.history]
        best = state.best[j]
        common = dict(history=history, seconds=seconds, params=params, state=net.config_state(j),
                      best_state=best[2] if best else None, best_top1=best[0] if best else None,
                      best_epoch=best[1] if best else None)
        if j in state.failures:
            results.append(TrainResult(config, "failed", None, None, failure=state.failures[j], **common))
            continue
        top1, per_class = accuracy(predictions[j], eval_labels, len(cache.class_names)) if evaluate else (None, None)
        results.append(TrainResult(config, "ok", top1, per_class, **common))
    return results
