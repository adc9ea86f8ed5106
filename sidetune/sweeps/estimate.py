"""A sweep's wall time before it starts: one training step of each group's stack timed on a
real batch, times the steps its stacks take."""

from __future__ import annotations

import math
import time

import torch

from sidetune.cache.reader import Cache
from sidetune.compute import resolve_device
from sidetune.sidenets import SIDENETS
from sidetune.sweeps.protocol import resolve_protocol
from sidetune.training import SideNetBlueprint, TrainConfig, sidenet_blueprint
from sidetune.training.data import sample_batch
from sidetune.training.optim import StackedAdamW
from sidetune.training.stacking import default_stack_limit
from sidetune.training.step import StackedStep


def estimate_seconds(cache: Cache, configs: list[TrainConfig], device: str | torch.device, *, protocol: str = "auto",
                     top_k: int = 1, max_stack: int | None = None, train_split: str | None = None,
                     eval_split: str | None = None) -> float:
    """A rough wall time for `sweep`: one training step of each group's stack timed on a real
    batch (after the steps that warm up and capture it), times the steps its stacks take, for
    selection and the top-k's retraining (or the one phase of protocol none, on `train_split`).
    Refuses what `sweep` would refuse about the protocol, before anything is timed."""
    device = resolve_device(device) if isinstance(device, str) else device
    chosen = resolve_protocol(cache, protocol, train_split, eval_split)
    train_split = chosen.train
    groups: dict[tuple, list[TrainConfig]] = {}
    for config in configs:
        groups.setdefault(config.group_key(), []).append(config)
    limit = max_stack or default_stack_limit(device) or 64
    total = 0.0
    blueprints = {key: sidenet_blueprint(cache, members[0].method, dict(members[0].options))
                  for key, members in groups.items()}
    for key, members in groups.items():
        stack = min(len(members), limit)
        seconds = step_seconds(cache, blueprints[key], members[:stack], train_split, device)
        steps = math.ceil(cache.split(train_split).num_images / members[0].batch_size) * members[0].epochs
        if SIDENETS[members[0].method].closed_form:  # one solve, about a pass over the split
            steps = math.ceil(cache.split(train_split).num_images / members[0].batch_size)
        total += seconds * steps * math.ceil(len(members) / stack)
    if chosen.final_train is not None:  # the top-k retrained on train and validation, about one stack's worth
        first = configs[0]
        steps = math.ceil(cache.split(chosen.final_train).num_images / first.batch_size)
        steps *= 1 if SIDENETS[first.method].closed_form else first.epochs
        total += step_seconds(cache, blueprints[first.group_key()], configs[:min(top_k, len(configs))],
                              chosen.final_train, device) * steps
    return total


def step_seconds(cache: Cache, blueprint: SideNetBlueprint, configs: list[TrainConfig], split: str,
                 device: torch.device) -> float:
    """Seconds of one training step of `configs` stacked (those of the first one's group; their
    network: `blueprint`) on a batch of `split`, after the step that warms up and captures it; a
    closed form's forward pass over the batch (it takes no steps)."""
    first = configs[0]
    if len({c.group_key() for c in configs}) > 1:
        configs = [c for c in configs if c.group_key() == first.group_key()]
    net = blueprint.build(len(configs))
    net.reset_parameters([c.seed for c in configs])
    net.to(device)
    tokens, labels = sample_batch(cache, split, blueprint.stages, first.batch_size, device)
    if net.closed_form:
        with torch.no_grad():
            started = time.perf_counter()
            net(tokens)
            synchronize(device)
        return time.perf_counter() - started
    optimizer = StackedAdamW(net, torch.tensor([c.lr for c in configs]), torch.tensor([c.weight_decay for c in configs]))
    step = StackedStep(net, optimizer, torch.zeros(len(configs)), len(labels), tuple(tokens.shape[1:]), tokens.dtype,
                       cuda_graphs=device.type == "cuda")
    step(tokens, labels, 1, 1.0)  # warms up (and on CUDA captures)
    synchronize(device)
    started = time.perf_counter()
    for number in range(2, 4):
        step(tokens, labels, number, 1.0)
    synchronize(device)
    return (time.perf_counter() - started) / 2


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
