"""A split's features onto the training device, whatever its kind: stored splits and views
through the cache's loader (sidetune/cache/loader.py: resident or streamed), live splits through
the backbone (sidetune/live.py). Stage two's one entry to features; the cache layer below it
never reaches up to the backbone."""

from __future__ import annotations

from typing import Sequence

import torch

from sidetune.cache.loader import ResidentFeatures, StreamedFeatures, default_memory_budget
from sidetune.cache.reader import Cache


def load_features(cache: Cache, split: str, stages: Sequence[int], device: torch.device,
                  budget_bytes: int | None = None):
    """The split's features for training or evaluation: resident when the requested stages
    fit `budget_bytes` (default: half the device's free memory), streamed otherwise; a live
    split's computed through the backbone (sidetune/live.py)."""
    return LoadedSplits(cache, device, budget_bytes).get(split, stages)


class LoadedSplits:
    """The splits loaded so far, kept for the next user: consecutive stacks of a sweep that
    read the same stages share one load of each split instead of reading the cache again, and
    views share their parent's. Asking for other stages drops what is held first, so at most
    one stage set is in memory."""

    def __init__(self, cache: Cache, device: torch.device, budget_bytes: int | None = None, progress=None):
        self.cache, self.device, self.budget_bytes = cache, device, budget_bytes
        self.progress = progress  # a sidetune.progress.ProgressSink for a live split's pass through the backbone
        self.stages: tuple[int, ...] | None = None
        self.held: dict[str, object] = {}

    def get(self, split: str, stages: Sequence[int]):
        if tuple(stages) != self.stages:
            self.held.clear()
            self.stages = tuple(stages)
        if split not in self.held:
            self.held[split] = self._load(self.cache.split(split), stages)
        return self.held[split]

    def _load(self, split, stages: Sequence[int]):
        if split.kind == "live":
            from sidetune.live import LiveFeatures  # runs the backbone: only for a split kept out of the cache

            return LiveFeatures(self.cache, split.name, stages, self.device, self.progress)
        budget = default_memory_budget(self.device) if self.budget_bytes is None else self.budget_bytes
        stored = split.parent if split.kind == "view" else split
        if stored.num_images * stored.image_nbytes(stages) > budget:  # image_nbytes refuses missing stages
            stored.require_complete()  # before any thread starts
            return StreamedFeatures(split, stages, self.device, budget)
        if split.kind == "view":
            parent = self.get(stored.name, stages)
            return parent.view(split)
        return ResidentFeatures.load(split, stages, self.device)
