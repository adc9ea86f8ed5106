"""A split's features on the training device, whatever its kind: stored splits and views
resident when they fit the memory budget, streamed shard by shard otherwise; live splits
through the backbone (sidetune/live.py, imported only for them). Stage two's one entry to
features: the cache layer below never reaches up to the backbone.

Both kinds hand out batches already on the device, decoded to what side networks read (int8
tokens are decoded there, batch by batch). `ResidentFeatures` loads the split once and gathers
every batch on the device; a view shares its parent split's resident tokens and gathers its own
rows. `StreamedFeatures` reads windows of whole shards (the most that fit the budget), shuffles
within a window, and reads the next window on a background thread while the current one
trains; a streamed view reads its parent's shards and keeps its rows. zarr is read in whole
shards only, never per batch."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Sequence

import numpy as np
import torch

from sidetune.cache.codec import Codec
from sidetune.cache.reader import Cache, CachedSplit, ViewSplit
from sidetune.compute import free_memory
from sidetune.errors import SidetuneError

Batch = tuple[torch.Tensor, torch.Tensor]  # (B, S, T, D) or (B, E) tokens (sidetune/cache/layout.py), (B,) labels
BUDGET_FRACTION = 0.5  # of the device's free memory, for the features of one split


def default_memory_budget(device: torch.device) -> int:
    """Bytes a split's features may occupy on `device`: half of what is free now."""
    return int(free_memory(device) * BUDGET_FRACTION)


def _on_device(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array).to(device)


class ResidentFeatures:
    """A whole split in device memory (as stored: a float type, or int8 and scales); batches are
    gathered and decoded on the device. A view holds its parent's tensors and its own rows."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor | None, labels: torch.Tensor, codec: Codec,
                 rows: torch.Tensor | None = None, positions: torch.Tensor | None = None, view_count: int = 0):
        self.codes, self.scales, self.labels, self.codec, self.rows = codes, scales, labels, codec, rows
        self.positions = positions  # the stages read, as positions on the held stage axis (None: all)
        # augmented views: codes hold `view_count` rows per stored image, and `choose_views` picks
        # the one each image shows this epoch
        self.view_count, self.view_choice = view_count, None
        self.num_images = len(labels)
        shape = tuple(codes.shape[1:])
        self.sample_shape = shape if positions is None else (len(positions), *shape[1:])
        self.dtype = codec.decoded_dtype

    @classmethod
    def load(cls, split: CachedSplit, stages: Sequence[int], device: torch.device) -> "ResidentFeatures":
        codes, scales = split.load_stored(stages)
        return cls(_on_device(codes, device), _on_device(scales, device), _on_device(split.labels, device), split.codec)

    @classmethod
    def load_views(cls, split: CachedSplit, stages: Sequence[int], count: int, device: torch.device) -> "ResidentFeatures":
        """The first `count` augmented views of a stored split's images, `count` rows per image."""
        views, scales = split.load_views(stages, count)
        flat = lambda array: None if array is None else _on_device(array.reshape(-1, *array.shape[2:]), device)  # noqa: E731
        return cls(flat(views), flat(scales), _on_device(split.labels, device), split.codec, view_count=count)

    def choose_views(self, generator: torch.Generator) -> None:
        """Draw the view each stored image shows until the next draw (one per image per epoch)."""
        stored = len(self.codes) // self.view_count
        self.view_choice = torch.randint(self.view_count, (stored,), generator=generator).to(self.codes.device)

    def view(self, split: ViewSplit) -> "ResidentFeatures":
        """The rows of this (parent) split that make up `split`, sharing its device memory."""
        device = self.codes.device
        viewed = ResidentFeatures(self.codes, self.scales, _on_device(split.labels, device), self.codec,
                                  _on_device(split.rows, device), self.positions, self.view_count)
        return viewed

    def select_stages(self, positions: list[int]) -> "ResidentFeatures | None":
        """These features read at some of their stages (positions on the stage axis), sharing
        the device memory; None where the layout cannot (stages of different shapes, stored flat)."""
        if self.codes.dim() != 4:
            return None
        chosen = torch.tensor(positions, device=self.codes.device)
        if self.positions is not None:
            chosen = self.positions[chosen]
        return ResidentFeatures(self.codes, self.scales, self.labels, self.codec, self.rows, chosen, self.view_count)

    @property
    def tokens(self) -> torch.Tensor:
        """Every image decoded, (N, S, T, D): for inspection; training gathers batch by batch."""
        return self._gather(torch.arange(self.num_images, device=self.codes.device))

    def _gather(self, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.rows is not None:
            index = self.rows[index]
        if self.view_count:  # the row of the view each image shows this epoch
            index = index * self.view_count + self.view_choice[index]
        if self.scales is None:  # a float type: decoding reinterprets at most, so gather straight into `out`
            source = self.codec.decode(self.codes, None)
            if self.positions is None:
                return torch.index_select(source, 0, index, out=out) if out is not None else source[index]
            decoded = source[index][:, self.positions]
        else:
            codes, scales = self.codes[index], self.scales[index]
            if self.positions is not None:
                codes, scales = codes[:, self.positions], scales[:, self.positions]
            decoded = self.codec.decode(codes, scales)
        return decoded if out is None else out.copy_(decoded)

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[Batch]:
        """Batches in a random order drawn from `shuffle`, or in stored order when None. With
        `out` (buffers of `batch_size` rows), batches are gathered straight into them."""
        device = self.codes.device
        if shuffle is None:
            order = torch.arange(self.num_images, device=device)
        else:
            order = torch.randperm(self.num_images, generator=shuffle).to(device)
        for begin in range(0, self.num_images, batch_size):
            index = order[begin:begin + batch_size]
            if out is None:
                yield self._gather(index), self.labels[index]
                continue
            tokens, labels = out[0][:len(index)], out[1][:len(index)]
            self._gather(index, tokens)
            torch.index_select(self.labels, 0, index, out=labels)
            yield tokens, labels


class StreamedFeatures:
    """A split read a window of whole shards at a time, the next window prefetched on a thread.

    With a `shuffle` generator, the shard order is shuffled and images are shuffled within each
    window; a batch may span two windows (the remainder of one is carried into the next). A view
    streams the shards of its parent that hold its rows, in the parent's order; its `labels`
    follow that order."""

    def __init__(self, split: CachedSplit | ViewSplit, stages: Sequence[int], device: torch.device, budget_bytes: int):
        parent = split.parent if isinstance(split, ViewSplit) else split
        self.split, self.stages, self.device, self.codec = parent, list(stages), device, parent.codec
        self.shard_size = parent.shard_size
        if isinstance(split, ViewSplit):
            rows, labels = split.rows, split.labels
            order = np.argsort(rows, kind="stable")
            self.rows, labels = rows[order], labels[order]
        else:
            self.rows, labels = np.arange(parent.num_images), parent.labels
        self.num_images = len(self.rows)
        self.labels_host = torch.from_numpy(labels)
        self.labels = self.labels_host.to(device)
        self.sample_shape = parent.layout.image_shape(self.stages)
        self.dtype = self.codec.decoded_dtype
        # Two windows live at once (the one training, the one being read).
        self.shards_per_window = max(1, budget_bytes // (2 * parent.image_nbytes(stages) * self.shard_size))
        shard_of_row = self.rows // self.shard_size
        self.shards = sorted(set(shard_of_row.tolist()))
        self.positions = {shard: np.flatnonzero(shard_of_row == shard) for shard in self.shards}  # into self.rows

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[Batch]:
        """As `ResidentFeatures.batches`; `out` is accepted for the same signature (a batch is a
        view of the window, copied by the caller where it needs it elsewhere)."""
        shard_order = list(self.shards)
        if shuffle is not None:
            shard_order = [shard_order[i] for i in torch.randperm(len(shard_order), generator=shuffle).tolist()]
        step = self.shards_per_window
        windows = [shard_order[i:i + step] for i in range(0, len(shard_order), step)]
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
        blocks, labels = [[], []], []
        for shard in shards:
            start = shard * self.shard_size
            stored = slice(start, min(start + self.shard_size, self.split.num_images))
            mine = self.positions[shard]
            for kept, block in zip(blocks, self.split.read_stored(stored, self.stages)):
                if block is not None:
                    kept.append(block[self.rows[mine] - start])
            labels.append(self.labels_host[mine])
        tokens, scales = (torch.from_numpy(np.concatenate(kept)) if kept else None for kept in blocks)
        if self.device.type == "cuda":
            tokens, scales = (None if t is None else t.pin_memory() for t in (tokens, scales))
        tokens = self.codec.decode(tokens.to(self.device, non_blocking=True),
                                   None if scales is None else scales.to(self.device, non_blocking=True))
        return tokens, torch.cat(labels).to(self.device, non_blocking=True)

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


def sample_batch(cache: Cache, split: str, stages: Sequence[int], batch_size: int, device: torch.device) -> Batch:
    """A batch of `split`'s shape as training sees it: the first images of its stored split,
    decoded on `device` by the cache's codec (what stacking measures memory on and the sweep's
    estimate times a step on)."""
    stored = cache.split(split).stored
    rows = slice(0, min(batch_size, stored.num_images))
    tokens, scales = stored.read_stored(rows, stages)
    decoded = stored.codec.decode(_on_device(tokens, device), _on_device(scales, device))
    return decoded, _on_device(stored.labels[rows], device)


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

    def hold(self, stages: Sequence[int]) -> None:
        """Hold the features of `stages` from now on (a sweep: the union of its groups'), so that
        groups reading some of them share one load of each split."""
        stages = tuple(sorted(set(stages)))
        if self.stages is None or not set(stages) <= set(self.stages):
            self.held.clear()
            self.stages = stages

    def get(self, split: str, stages: Sequence[int]):
        stages = tuple(stages)
        if self.stages is not None and stages != self.stages and set(stages) <= set(self.stages):
            positions = [self.stages.index(stage) for stage in stages]
            held = self._held(split)
            selected = held.select_stages(positions) if isinstance(held, ResidentFeatures) else None
            if selected is not None:
                return selected
        if stages != self.stages:
            self.held.clear()
            self.stages = stages
        return self._held(split)

    def _held(self, split: str):
        if split not in self.held:
            self.held[split] = self._load(self.cache.split(split), self.stages)
        return self.held[split]

    def get_views(self, split: str, stages: Sequence[int], count: int) -> ResidentFeatures:
        """The first `count` augmented views of `split`'s images (of its stored split, for a
        view), resident: call `choose_views` before each epoch's batches."""
        found = self.cache.split(split)
        stored = found.stored
        key = f"{stored.name} views {count} {tuple(stages)}"
        budget = default_memory_budget(self.device) if self.budget_bytes is None else self.budget_bytes
        if key not in self.held:
            needed = stored.num_images * count * stored.image_nbytes(stages)
            if needed > budget:
                raise SidetuneError(
                    f"The {count} augmented views of {stored.name} take {needed / 1e9:.1f} GB, more than the "
                    f"{budget / 1e9:.1f} GB memory budget; views are read from device memory only. Raise "
                    "--memory-budget, or draw from fewer views (--views).")
            self.held[key] = ResidentFeatures.load_views(stored, stages, count, self.device)
        held = self.held[key]
        return held if found.kind == "stored" else held.view(found)

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
            parent = self._held(stored.name)
            return parent.view(split)
        return ResidentFeatures.load(split, stages, self.device)
