"""Successive halving inside a stack (`sweep --halving`): every configuration starts; at each
rung (epochs m, m·η, m·η², ... before the last) the stack is scored on the evaluation split and
only the best 1/η keep training, as a smaller stack, so the work shrinks. The others keep their
rung's score and state and are reported as pruned, never dropped. Learning-rate schedules are
those of the full-length runs: pruning only stops a configuration early, and a survivor ends
exactly where it would have without halving (the engine resumes it from its saved state)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from sidetune.cache.reader import Cache
from sidetune.errors import SidetuneError
from sidetune.training import EpochStats, GroupState, TrainConfig, TrainResult, train_group


@dataclass(frozen=True)
class Halving:
    """Reduction factor η (keep the best 1/η at each rung) and the first rung's epochs m."""

    factor: int = 3
    min_epochs: int = 1

    def __post_init__(self) -> None:
        if self.factor < 2 or self.min_epochs < 1:
            raise SidetuneError(f"Successive halving needs a reduction factor of at least 2 and a first rung of at least "
                                f"1 epoch (got {self.factor} and {self.min_epochs}); e.g. --halving-factor 3.")

    def rungs(self, epochs: int) -> list[int]:
        """The epochs after which the stack is scored and cut: m, m·η, ... below `epochs`."""
        rungs, epoch = [], self.min_epochs
        while epoch < epochs:
            rungs.append(epoch)
            epoch *= self.factor
        return rungs


def train_with_halving(cache: Cache, configs: list[TrainConfig], train_split: str, eval_split: str,
                       device: torch.device, halving: Halving,
                       on_epoch_of: Callable[[list[int]], Callable[[EpochStats], None] | None] = lambda alive: None,
                       **options) -> list[TrainResult]:
    """`train_group` with successive halving: results in the order of `configs`, status "pruned"
    (with the rung's top-1, history and state) for the configurations cut at a rung.
    `on_epoch_of(alive)` gives the epoch callback while the configs at positions `alive` train."""
    if cache.split(eval_split).kind == "live":
        raise SidetuneError(f"Successive halving scores the stack on the evaluation split at every rung; {eval_split} "
                            "is live (through the backbone). Halve on a cached split (the default protocol selects on the cached "
                            "validation split).")
    results: dict[int, TrainResult] = {}
    alive, state, elapsed = list(range(len(configs))), None, 0.0
    for rung in halving.rungs(configs[0].epochs):
        saved: list[GroupState] = []
        scored = train_group(cache, [configs[i] for i in alive], train_split, eval_split, device, resume=state,
                             checkpoint=saved.append, until_epoch=rung, on_epoch=on_epoch_of(alive), **options)
        elapsed += scored[0].seconds
        ranked = sorted(range(len(alive)), key=lambda j: -scored[j].top1 if scored[j].status == "ok" else math.inf)
        keep = sorted(ranked[:math.ceil(len(alive) / halving.factor)])
        for j, result in enumerate(scored):
            if j not in keep:
                results[alive[j]] = replace(result, status="pruned" if result.status == "ok" else result.status,
                                            seconds=elapsed)
        state, alive = saved[-1].select(keep), [alive[j] for j in keep]
    finished = train_group(cache, [configs[i] for i in alive], train_split, eval_split, device, resume=state,
                           on_epoch=on_epoch_of(alive), **options)
    for i, result in zip(alive, finished):
        results[i] = replace(result, seconds=elapsed + result.seconds)
    return [results[i] for i in range(len(configs))]
