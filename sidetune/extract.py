"""Stage one: images -> frozen backbone -> zarr feature cache.

Shards are the unit of work: batches never straddle a shard, so a shard computed after an
interruption is bit-for-bit the shard an uninterrupted run computes. Finished shards are
never recomputed; a split is marked complete only when all its shards are written."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sidetune.backbones import Backbone, Preprocessing, forward_stages, load_backbone, resolve_preprocessing
from sidetune.cache.location import Location
from sidetune.cache.manifest import build_manifest
from sidetune.cache.spec import CacheSpec, load_spec
from sidetune.cache.store import FLOAT16_MAX, CacheWriter, SplitWriter
from sidetune.compute import autocast, precision_name, resolve_compute
from sidetune.datasets import ImageSplit, load_source
from sidetune.distributed import World, current_world, launched_rank
from sidetune.errors import SidetuneError



@dataclass
class SplitReport:
    name: str
    num_images: int
    shards_computed: int
    shards_skipped: int
    seconds: float
    complete: bool


class ProgressSink:
    """Receives progress events; the CLI plugs a rich progress bar in, the API stays quiet."""

    def start_split(self, name: str, total_images: int, done_images: int) -> None: ...
    def advance(self, images: int) -> None: ...


def extract(
    model: str,
    dataset: str,
    out: str | Path | None = None,
    *,
    spec: str | CacheSpec = "default",
    splits: list[str] | None = None,
    data_root: str | Path | None = None,
    weights: str | Path | None = None,
    pretrained: bool = True,
    preprocess: str = "vtab",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    progress: ProgressSink | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> list[SplitReport]:
    """Run the frozen backbone over a dataset once and write (or resume) its feature cache at
    `out`: a folder, or an fsspec URL (s3://bucket/caches/dtd, gs://..., file://..., memory://...).

    Returns one report per split. Raises SidetuneError for any problem with the inputs,
    before any compute where it can be known in advance."""
    out = out if out is not None else default_cache_path(dataset)
    if launched_rank() == 0:  # under torchrun rank 0 alone touches the folder before the store exists
        Location(out).check_writable()
    cache_spec = spec if isinstance(spec, CacheSpec) else load_spec(spec)
    torch_device, autocast_dtype = resolve_compute(device, precision)
    source = load_source(dataset, data_root=data_root, splits=splits, limit=limit)
    backbone = load_backbone(model, weights=weights, pretrained=pretrained)
    preprocessing = resolve_preprocessing(preprocess, backbone)
    stages = cache_spec.resolve_stages(backbone.depth)
    token_shape = (len(stages), cache_spec.num_tokens(backbone.num_tokens), backbone.width)

    manifest = build_manifest(
        backbone=backbone.describe(),
        preprocessing=preprocessing.describe(),
        dataset=source.describe(),
        spec=cache_spec.describe(),
        stages=stages,
        num_tokens=token_shape[1],
        compute={"precision": precision_name(autocast_dtype), "device": torch_device.type},
    )
    world = current_world(torch_device)
    torch_device = world.device(torch_device)
    if world.is_main:  # rank 0 creates (or verifies) the store, the manifest and every split's arrays
        writer = CacheWriter.open(out, manifest, overwrite=overwrite)
        norm = backbone.final_norm()
        if norm is not None:
            writer.write_backbone_params({
                "final_norm_weight": norm.weight.detach().cpu().numpy(),
                "final_norm_bias": norm.bias.detach().cpu().numpy(),
            })
        for note in source.notes:
            log(f"note: {note}")
    world.barrier()
    if not world.is_main:
        writer = CacheWriter.attach(out, manifest)

    backbone.model.to(torch_device)
    workers = default_workers(torch_device) if workers is None else workers
    progress = progress if progress is not None and world.is_main else ProgressSink()
    reports = []
    for name, split in source.splits.items():
        if writer.is_complete(name):
            log(f"{name}: already complete, skipped")
            reports.append(SplitReport(name, len(split), 0, 0, 0.0, True))
            continue
        arrays = (name, split.labels, token_shape, cache_spec.dtype, cache_spec.chunk_images,
                  cache_spec.shard_images, cache_spec.compressor)
        if world.is_main:
            split_writer = writer.split(*arrays)  # creates the split's arrays
        world.barrier()
        if not world.is_main:
            split_writer = writer.split(*arrays)  # opens them
        reports.append(_extract_split(
            name, split, split_writer, writer, backbone, preprocessing, cache_spec, stages,
            torch_device, autocast_dtype, batch_size, workers, progress, world,
        ))
    return reports


def _extract_split(name: str, split: ImageSplit, split_writer: SplitWriter, writer: CacheWriter,
                   backbone: Backbone, preprocessing: Preprocessing, spec: CacheSpec, stages: list[int],
                   device: torch.device, autocast_dtype: torch.dtype | None, batch_size: int,
                   workers: int, progress: ProgressSink, world: World) -> SplitReport:
    """This rank's share of the split's pending shards (all of them in one process); then,
    after every rank is done, rank 0 checks every shard and marks the split complete."""
    started = time.perf_counter()
    all_pending = world.broadcast(split_writer.pending_shards())
    pending = world.share(all_pending)
    pending_images = sum(stop - start for start, stop in map(split_writer.shard_bounds, all_pending))
    progress.start_split(name, len(split), len(split) - pending_images)
    batches = [
        list(range(start, stop))
        for shard in pending
        for start, stop in _batch_bounds(*split_writer.shard_bounds(shard), batch_size)
    ]
    loader = DataLoader(
        _ImageDataset(split, preprocessing.transform()),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    # Under torchrun, rank 0's bar counts the shards every rank has written (total throughput).
    watching = world.size > 1 and world.is_main  # the other ranks show no progress: no need to poll
    monitor = _ShardMonitor(split_writer, all_pending, progress) if watching else contextlib.nullcontext()
    with monitor:
        with _ShardWriterThread(split_writer) as shard_writer, torch.inference_mode():
            assembler = _ShardAssembler(split_writer, pending)
            for images, indices, errors in loader:
                if errors:
                    raise SidetuneError(
                        f"Could not read image {errors[0]}. Fix or remove it (and its line in the list "
                        "file, if any), then rerun the same command: finished shards are kept."
                    )
                with autocast(device, autocast_dtype):  # the forward only: CPU autocast refuses cat of float16
                    stacked = stored_tokens(backbone, spec, stages, images.to(device, non_blocking=True))
                # max |x| per stage as max(max, -min): two reductions, no |x| copy (7x faster on CPU)
                absmax = torch.maximum(stacked.amax(dim=(0, 2, 3)), -stacked.amin(dim=(0, 2, 3))).float().cpu().numpy()
                _check_range(stacked, absmax, spec, stages, name, split, indices)
                tokens = stacked.to(spec.torch_dtype()).cpu()
                for shard, shard_tokens, shard_absmax in assembler.add(indices, tokens, absmax):
                    shard_writer.submit(shard, shard_tokens, shard_absmax)
                if world.size == 1:
                    progress.advance(len(indices))
        world.barrier()  # every rank's shards are written (its writer thread has drained)
    complete = world.broadcast(writer.finish_split(split_writer) if world.is_main else None)
    skipped = split_writer.num_shards - len(all_pending)
    return SplitReport(name, len(split), len(pending), skipped, time.perf_counter() - started, complete)


def stored_tokens(backbone: Backbone, spec: CacheSpec, stages: list[int], images: torch.Tensor) -> torch.Tensor:
    """(B, S, T, D) float32 tokens of one batch, as the cache stores them before the cast to
    the spec's dtype. Extraction and `predict` both compute features through here."""
    outputs = [
        spec.select_tokens(x, backbone.num_prefix_tokens).float()
        for x in forward_stages(backbone.model, images, stages)
    ]
    return torch.stack(outputs, dim=1)


def _check_range(stacked: torch.Tensor, absmax: np.ndarray, spec: CacheSpec, stages: list[int],
                 split_name: str, split: ImageSplit, indices: list[int]) -> None:
    if not np.isfinite(absmax).all():
        bad_stage = stages[int(np.flatnonzero(~np.isfinite(absmax))[0])]
        bad_image = indices[int(torch.nonzero(~torch.isfinite(stacked).flatten(1).all(1))[0])]
        raise SidetuneError(
            f"The backbone produced non-finite values at stage {bad_stage} for {split.describe(bad_image)} "
            f"in split {split_name}. With --precision fp16 this is overflow: use --precision bf16 or fp32."
        )
    if spec.dtype == "float16" and absmax.max() > FLOAT16_MAX:
        bad = [f"stage {stages[i]} (max |x| = {absmax[i]:.4g})" for i in np.flatnonzero(absmax > FLOAT16_MAX)]
        raise SidetuneError(
            f"Activations overflow float16 in split {split_name}: {', '.join(bad)} exceed {FLOAT16_MAX:.0f}. "
            "Nothing was stored as inf. Use a cache spec with dtype: bfloat16 or float32 (and --overwrite)."
        )


class _ShardMonitor:
    """Advances `progress` by the images of pending shards as any rank marks them written,
    polling the split's small shard_complete array from a thread."""

    def __init__(self, writer: SplitWriter, pending: list[int], progress: ProgressSink, every: float = 1.0):
        self.writer, self.pending, self.progress, self.every = writer, set(pending), progress, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="sidetune-progress")

    def _poll(self) -> None:
        done = self.pending.difference(self.writer.pending_shards())
        for shard in done:
            start, stop = self.writer.shard_bounds(shard)
            self.progress.advance(stop - start)
        self.pending -= done

    def _watch(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self._poll()
            except Exception:  # a mark being written as we read it; the display must never stop the work
                continue

    def __enter__(self) -> "_ShardMonitor":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        if exc[0] is None:
            self._poll()


class _ShardAssembler:
    """Collects per-batch outputs (in pending-shard order) into whole shards."""

    def __init__(self, writer: SplitWriter, pending: list[int]):
        self.writer = writer
        self.pending = list(pending)
        self.buffer: list[torch.Tensor] = []
        self.absmax: np.ndarray | None = None
        self.filled = 0

    def add(self, indices: list[int], tokens: torch.Tensor, absmax: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        shard = self.pending[0]
        start, stop = self.writer.shard_bounds(shard)
        if indices[0] != start + self.filled:
            raise RuntimeError(f"batch starting at image {indices[0]} arrived out of order for shard {shard}")
        self.buffer.append(tokens)
        self.absmax = absmax if self.absmax is None else np.maximum(self.absmax, absmax)
        self.filled += len(indices)
        if self.filled == stop - start:
            yield shard, torch.cat(self.buffer).numpy(), self.absmax
            self.pending.pop(0)
            self.buffer, self.absmax, self.filled = [], None, 0


class _ShardWriterThread:
    """Writes finished shards in the background so compute never waits for the disk; at most
    two shards are in flight. Errors surface on the next submit or on exit."""

    def __init__(self, writer: SplitWriter):
        self.writer = writer
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidetune-writer")
        self.inflight: list[Future] = []

    def submit(self, shard: int, tokens: np.ndarray, absmax: np.ndarray) -> None:
        while len(self.inflight) >= 2:
            self.inflight.pop(0).result()
        self.inflight.append(self.executor.submit(self.writer.write_shard, shard, tokens, absmax))

    def __enter__(self) -> "_ShardWriterThread":
        return self

    def __exit__(self, *exc) -> None:
        try:
            for future in self.inflight:
                future.result()
        finally:
            self.executor.shutdown(wait=True)


class _ImageDataset(Dataset):
    def __init__(self, split: ImageSplit, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        try:
            return self.transform(self.split.image(index)), index, None
        except Exception as error:  # reported by the main process with the file's name
            return None, index, f"{self.split.describe(index)} ({type(error).__name__}: {error})"


def _collate(items):
    errors = [error for _, _, error in items if error is not None]
    if errors:
        return None, [index for _, index, _ in items], errors
    return torch.stack([image for image, _, _ in items]), [index for _, index, _ in items], []


def _batch_bounds(start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for begin in range(start, stop, batch_size):
        yield begin, min(begin + batch_size, stop)


def default_workers(device: torch.device) -> int:
    cpus = os.cpu_count() or 1
    return min(8, cpus) if device.type == "cuda" else max(0, min(4, cpus // 2))


def default_cache_path(dataset: str) -> Path:
    """Where `extract` writes when no --out is given: ./cache/<dataset name>."""
    return Path("cache") / Path(dataset.removeprefix("hf:")).name
