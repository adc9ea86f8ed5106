"""Bringing a cached split onto the training device: resident when it fits the memory budget,
streamed shard by shard otherwise.

Both kinds hand out batches already on the device. `ResidentFeatures` loads the split once and
gathers every batch on the device. `StreamedFeatures` reads windows of whole shards (the most
that fit the budget), shuffles within a window, and reads the next window on a background
thread while the current one trains. zarr is read in whole shards only, never per batch."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Sequence

import numpy as np
import torch

from sidetune.cache.reader import Cache, CachedSplit
from sidetune.compute import free_memory

Batch = tuple[torch.Tensor, torch.Tensor]  # (B, S, T, D) tokens, (B,) labels
BUDGET_FRACTION = 0.5  # of the device's free memory, for the features of one split


def default_memory_budget(device: torch.device) -> int:
    """Bytes a split's features may occupy on `device`: half of what is free now."""
    return int(free_memory(device) * BUDGET_FRACTION)


class ResidentFeatures:
    """A whole split in device memory; batches are gathered on the device."""

    def __init__(self, split: CachedSplit, stages: Sequence[int], device: torch.device):
        self.num_images = split.num_images
        self.tokens = torch.from_numpy(split.load(stages)).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.sample_shape, self.dtype = tuple(self.tokens.shape[1:]), self.tokens.dtype

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[Batch]:
        """Batches in a random order drawn from `shuffle`, or in stored order when None. With
        `out` (buffers of `batch_size` rows), shuffled batches are gathered straight into them."""
        if shuffle is None:
            for begin in range(0, self.num_images, batch_size):
                yield self.tokens[begin:begin + batch_size], self.labels[begin:begin + batch_size]
            return
        order = torch.randperm(self.num_images, generator=shuffle).to(self.tokens.device)
        for begin in range(0, self.num_images, batch_size):
            index = order[begin:begin + batch_size]
            if out is None:
                yield self.tokens[index], self.labels[index]
                continue
            tokens, labels = out[0][:len(index)], out[1][:len(index)]
            torch.index_select(self.tokens, 0, index, out=tokens)
            torch.index_select(self.labels, 0, index, out=labels)
            yield tokens, labels


class StreamedFeatures:
    """A split read a window of whole shards at a time, the next window prefetched on a thread.

    With a `shuffle` generator, the shard order is shuffled and images are shuffled within each
    window; a batch may span two windows (the remainder of one is carried into the next)."""

    def __init__(self, split: CachedSplit, stages: Sequence[int], device: torch.device, budget_bytes: int):
        self.split, self.stages, self.device = split, list(stages), device
        self.num_images = split.num_images
        self.labels_host = torch.from_numpy(split.labels)
        self.labels = self.labels_host.to(device)
        self.shard_size = split.shard_size
        self.sample_shape = (len(self.stages), *split.tokens.shape[2:])
        self.dtype = torch.from_numpy(np.empty(0, dtype=split.tokens.dtype)).dtype
        # Two windows live at once (the one training, the one being read).
        self.shards_per_window = max(1, budget_bytes // (2 * split.image_nbytes(stages) * self.shard_size))
        self.num_shards = -(-self.num_images // self.shard_size)

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[Batch]:
        """As `ResidentFeatures.batches`; `out` is accepted for the same signature (a batch is a
        view of the window, copied by the caller where it needs it elsewhere)."""
        shard_order = list(range(self.num_shards))
        if shuffle is not None:
            shard_order = torch.randperm(self.num_shards, generator=shuffle).tolist()
        windows = [shard_order[i:i + self.shards_per_window] for i in range(0, self.num_shards, self.shards_per_window)]
        carry: Batch | None = None
        for tokens, labels in self._prefetched(windows):
            if shuffle is not None:
                permutation = torch.randperm(len(labels), generator=shuffle).to(self.device)
                tokens, labels = tokens[permutation], labels[permutation]
            if carry is not None:
                tokens, labels = torch.cat([carry[0], tokens]), torch.cat([carry[1], labels])
                carry = None
            full = len(labels) - len(labels) % batch_size
            for begin in range(0, full, batch_size):
                yield tokens[begin:begin + batch_size], labels[begin:begin + batch_size]
            if full < len(labels):
                carry = tokens[full:], labels[full:]
        if carry is not None:
            yield carry

    def _read_window(self, shards: list[int]) -> Batch:
        blocks, labels = [], []
        for shard in shards:
            rows = slice(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images))
            blocks.append(self.split.read_rows(rows, self.stages))
            labels.append(self.labels_host[rows])
        tokens = torch.from_numpy(np.concatenate(blocks))
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        return tokens.to(self.device, non_blocking=True), torch.cat(labels).to(self.device, non_blocking=True)

    def _prefetched(self, windows: list[list[int]]) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def read_all() -> None:
            try:
                for window in windows:
                    if stop.is_set():
                        return
                    ready.put(self._read_window(window))
            except BaseException as error:  # surfaced in the consuming thread
                ready.put(error)
            ready.put(None)

        reader = threading.Thread(target=read_all, daemon=True, name="sidetune-prefetch")
        reader.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the consumer stopped early: let the reader finish its current window and exit
            stop.set()
            while reader.is_alive():
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass


def load_features(cache: Cache, split: str, stages: Sequence[int], device: torch.device,
                  budget_bytes: int | None = None) -> ResidentFeatures | StreamedFeatures:
    """The split's features for training or evaluation: resident when the requested stages
    fit `budget_bytes` (default: half the device's free memory), streamed otherwise."""
    cached = cache.split(split)
    budget = default_memory_budget(device) if budget_bytes is None else budget_bytes
    if cached.num_images * cached.image_nbytes(stages) <= budget:  # image_nbytes refuses missing stages
        return ResidentFeatures(cached, stages, device)
    cached.require_complete()  # before any thread starts
    return StreamedFeatures(cached, stages, device, budget)


class LoadedSplits:
    """The splits the last stack loaded, kept for the next one: consecutive stacks of a sweep
    that read the same stages share one load of each split instead of reading the cache again.
    Asking for other stages drops what is held first, so at most one stage set is in memory."""

    def __init__(self, cache: Cache, device: torch.device, budget_bytes: int | None = None):
        self.cache, self.device, self.budget_bytes = cache, device, budget_bytes
        self.stages: tuple[int, ...] | None = None
        self.held: dict[str, ResidentFeatures | StreamedFeatures] = {}

    def get(self, split: str, stages: Sequence[int]) -> ResidentFeatures | StreamedFeatures:
        if tuple(stages) != self.stages:
            self.held.clear()
            self.stages = tuple(stages)
        if split not in self.held:
            self.held[split] = load_features(self.cache, split, stages, self.device, self.budget_bytes)
        return self.held[split]
