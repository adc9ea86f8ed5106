"""Which configurations train together: same-shape configs form a group, and a group is cut
into stacks that fit the device's memory.

What one more configuration costs is measured, not guessed: one batch is run through the
side network at K = 1 and K = 2 while a saved-tensors hook records every tensor kept for
the backward pass; the difference (plus parameters, gradients and AdamW moments) is the
per-configuration cost, the rest is shared (the batch itself)."""

from __future__ import annotations

import torch

from sidetune.cache.reader import Cache
from sidetune.compute import free_memory
from sidetune.training.build import SideNetBlueprint
from sidetune.training.config import TrainConfig
from sidetune.training.data import Batch, default_memory_budget, sample_batch
from sidetune.training.step import cross_entropy_per_config, training_autocast

USABLE_FRACTION = 0.8  # of the memory left after the features, for the stack
HEADROOM = 2.0  # backward transients (activation gradients) beside the saved activations
# On the CPU, stacks beyond 16 get slower per configuration than separate runs (LAST r = 8:
# 64 stacked took 1.28x as long as 64 one after another; docs/benchmarks.md), so the CPU's
# default is at most 16. A GPU takes as many as fit.
CPU_STACK_LIMIT = 16


def default_stack_limit(device: torch.device) -> int | None:
    return CPU_STACK_LIMIT if device.type == "cpu" else None


def plan_stacks(configs: list[TrainConfig], capacity: int | dict[tuple, int]) -> list[list[int]]:
    """Indices of configs grouped by group key (in first-seen order), each group cut into
    stacks of at most `capacity` configs (one number, or one per group key)."""
    groups: dict[tuple, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(config.group_key(), []).append(index)
    stacks = []
    for key, members in groups.items():
        size = capacity[key] if isinstance(capacity, dict) else capacity
        stacks += [members[i:i + size] for i in range(0, len(members), size)]
    return stacks


def stack_memory(cache: Cache, blueprint: SideNetBlueprint, config: TrainConfig, split: str,
                 device: torch.device) -> tuple[int, int]:
    """(shared, per-config) bytes of one training step of `config`'s shape (its network:
    `blueprint`) on a batch of `split`, measured on `device`."""
    batch = sample_batch(cache, split, blueprint.stages, config.batch_size, device)
    one, two = (_step_bytes(blueprint, config, batch, device, k) for k in (1, 2))
    per_config = max(two - one, 1)
    return max(one - per_config, 0), per_config


def stack_capacity(cache: Cache, blueprint: SideNetBlueprint, config: TrainConfig, train_split: str, eval_split: str,
                   device: torch.device, *, memory_budget: int | None = None, available: int | None = None) -> int:
    """The most configurations of `config`'s shape that train stacked on `device`: the memory
    free now (or `available` bytes), less the two splits' features as the loader holds them
    (resident within `memory_budget`, else one streamed window of the same size), divided by
    what one more configuration costs. At least 1."""
    stages = list(blueprint.stages)
    budget = default_memory_budget(device) if memory_budget is None else memory_budget
    splits = [cache.split(s) for s in {train_split, eval_split}]
    held = {split.stored.name: split.stored for split in splits if split.kind != "live"}  # views share their parent's
    features = sum(min(split.num_images * split.image_nbytes(stages), budget) for split in held.values())
    available = free_memory(device) if available is None else available
    shared, per_config = stack_memory(cache, blueprint, config, train_split, device)
    room = (available - features) * USABLE_FRACTION - shared
    return max(1, int(room // (per_config * HEADROOM)))


def _step_bytes(blueprint: SideNetBlueprint, config: TrainConfig, batch: Batch, device: torch.device, k: int) -> int:
    net = blueprint.build(k)
    net.reset_parameters([config.seed] * k)
    net.to(device).train()
    tokens, labels = batch
    saved: dict[int, int] = {}

    def remember(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(remember, lambda tensor: tensor):
        with training_autocast(device):
            logits = net(tokens)
        cross_entropy_per_config(logits.float(), labels, torch.zeros(k, device=device)).sum()
    state = 4 * sum(p.numel() * p.element_size() for p in net.parameters())  # weights, gradients, 2 moments
    return sum(saved.values()) + state
