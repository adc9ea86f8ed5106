"""Stage one: images -> frozen backbone -> zarr feature cache.

Shards are the unit of work: batches never straddle a shard, so a shard computed after an
interruption is bit-for-bit the shard an uninterrupted run computes. Finished shards are
never recomputed; a split is marked complete only when all its shards are written."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from sidetune.backbones import Backbone, Preprocessing, load_backbone, resolve_preprocessing
from sidetune.cache.layout import TokenLayout
from sidetune.cache.location import Location
from sidetune.cache.manifest import LOCK_FILE, build_manifest
from sidetune.cache.plan import CachePlan, disk_is_full, plan_cache, refuse_if_too_big, split_layout
from sidetune.cache.spec import CacheSpec, available_specs, load_spec
from sidetune.cache.store import CacheWriter, SplitWriter, holds_cache
from sidetune.compute import autocast, precision_name, resolve_compute
from sidetune.datasets import VTAB_SPLITS, ImageSource, ImageSplit, load_source
from sidetune.datasets.video import DEFAULT_FRAMES, FrameSampling
from sidetune.distributed import World, current_world, launched_rank
from sidetune.errors import Interrupted, SidetuneError
from sidetune.features import (
    ImageDataset,
    batch_bounds,
    collate_images,
    default_workers,
    stage_absmax,
    stored_layout,
    stored_tokens,
)
from sidetune.progress import ProgressSink
from sidetune.replacing import recover, staging_path, swap_in
from sidetune.views import VIEW_TRANSFORMS, ViewTransform, view_seed

LIVE_BY_DEFAULT = ("test",)  # read once per reported configuration: cheaper through the backbone than on disk


def default_live_splits(split_names: list[str], requested: list[str] | None) -> set[str]:
    """Splits to leave out of the cache: VTAB-1k's test split when the dataset has the four
    VTAB-1k splits and the user did not name the splits to cache."""
    if requested or not all(name in split_names for name in VTAB_SPLITS):
        return set()
    return set(LIVE_BY_DEFAULT)


@dataclass
class SplitReport:
    name: str
    num_images: int
    shards_computed: int
    shards_skipped: int
    seconds: float
    complete: bool
    kind: str = "stored"  # or "view" (rows of a stored split) or "live" (kept out of the cache)


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
    views: int = 0,
    view_transform: str = "vpt",
    frames: int | None = None,
    frame_stride: int | None = None,
    progress: ProgressSink | None = None,
    log: Callable[[str], None] = lambda message: None,
    warn: Callable[[str], None] = lambda message: None,
) -> list[SplitReport]:
    """Run the frozen backbone over a dataset once and write (or resume) its feature cache at
    `out`: a folder, or an fsspec URL (s3://bucket/caches/dtd, gs://..., file://..., memory://...).

    Each image is stored once: a split whose images all lie in another stored split is kept as
    row indices into it (VTAB-1k's train800 and val200 inside train800val200). VTAB-1k's test
    split is left out unless `splits` names it: train, sweep and evaluate run its images through
    the backbone when they report it. Before any compute the bytes are planned and compared with
    the free space at `out` (`plan_extraction`); a cache that cannot fit is refused.

    A video dataset (clips: video files or frame folders) is cached clip by clip: `frames` of
    each (default 8, spread uniformly; or every `frame_stride`-th) through the backbone, each
    stage's frames one after another along its tokens (sidetune/datasets/video.py).

    `views` N stores N augmented views of every training image beside it (`view_transform`: vpt
    or dinov2, sidetune/views.py), each seeded by the image and the view's index; validation and
    test stay as they are. Stage two draws one view per image per epoch.

    Returns one report per split. Raises SidetuneError for any problem with the inputs,
    before any compute where it can be known in advance; `warn` hears what can be extracted but
    is likely a mistake (an empty class, an image listed twice: also recorded in the manifest)."""
    out = out if out is not None else default_cache_path(dataset)
    try:
        return _extract(model, dataset, out, spec=spec, splits=splits, data_root=data_root, weights=weights,
                        pretrained=pretrained, preprocess=preprocess, device=device, precision=precision,
                        batch_size=batch_size, workers=workers, limit=limit, overwrite=overwrite, views=views,
                        view_transform=view_transform, frames=frames, frame_stride=frame_stride, progress=progress,
                        log=log, warn=warn)
    except Exception as error:
        if disk_is_full(error):
            raise SidetuneError(
                f"The disk holding {out} filled up during extraction. Every finished shard is kept: free "
                "some space (`sidetune extract ... --dry-run` shows what the cache needs) and rerun the same "
                "command to resume."
            ) from None
        raise


def plan_extraction(model: str, dataset: str, out: str | Path | None = None, *, spec: str | CacheSpec = "default",
                    splits: list[str] | None = None, data_root: str | Path | None = None,
                    limit: int | None = None, views: int = 0, frames: int | None = None,
                    frame_stride: int | None = None) -> CachePlan:
    """What `extract` would write, without computing anything: per split whether it is stored,
    a view or live, its bytes, and the free space at `out` (the backbone's shapes come from a
    randomly initialised copy: no weights are read)."""
    out = out if out is not None else default_cache_path(dataset)
    cache_spec = spec if isinstance(spec, CacheSpec) else load_spec(spec)
    source = load_source(dataset, data_root=data_root, splits=splits, limit=limit,
                         sampling=frame_sampling(frames, frame_stride))
    backbone = load_backbone(model, pretrained=False)
    return _plan(out, cache_spec, source, backbone, splits, views=views)


def _plan(out: str | Path, spec: CacheSpec, source: ImageSource, backbone: Backbone, requested: list[str] | None,
          building: str | Path | None = None, views: int = 0) -> CachePlan:
    """The plan for `out`; the bytes already written where the cache is being built (`out`, or
    the replacement built beside it) count as free. With `views`, the stored splits holding the
    training images (of the train and train-and-validation roles) keep that many views of each."""
    layout = split_layout({name: split.keys() for name, split in source.splits.items()},
                          default_live_splits(list(source.splits), requested))
    if views:
        roles = source.split_roles
        viewed = {layout[name].parent or name for name in (roles.train, roles.final_training)
                  if name is not None and layout[name].kind != "live"}
        layout = {name: replace(split, views=views) if name in viewed else split for name, split in layout.items()}
    frames = source.sampling.frames if source.sampling is not None else 1
    plan = plan_cache(out, spec, layout, _token_shape(spec, backbone, frames),
                      existing_bytes=Location(building or out).local_bytes())
    return replace(plan, notes=list(source.notes), warnings=list(source.warnings))


def _token_shape(spec: CacheSpec, backbone: Backbone, frames: int = 1) -> tuple[int, ...]:
    return stored_layout(spec, backbone).over_frames(frames).image_shape()


def frame_sampling(frames: int | None, stride: int | None) -> FrameSampling | None:
    """How clips are read, when a frame option is given (else a video dataset's default)."""
    if frames is None and stride is None:
        return None
    return FrameSampling(frames or DEFAULT_FRAMES, stride)


def _refuse_unless_it_fits(plan: CachePlan, spec: CacheSpec, source: ImageSource, backbone: Backbone) -> None:
    if plan.fits:
        return
    layout = {split.name: split for split in plan.splits}
    frames = source.sampling.frames if source.sampling is not None else 1
    alternatives = {}
    for name in available_specs():
        other = load_spec(name)
        try:
            shape = _token_shape(other, backbone, frames)
        except SidetuneError:  # a stage gap that does not divide this backbone's depth
            continue
        if name != spec.name:
            alternatives[name] = plan_cache(plan.out, other, layout, shape).nbytes
    live_option = None
    if any(split.kind == "stored" and split.name in LIVE_BY_DEFAULT for split in plan.splits):
        without = {name: split for name, split in layout.items() if name not in LIVE_BY_DEFAULT}
        live_option = plan_cache(plan.out, spec, without, _token_shape(spec, backbone, frames)).nbytes
    refuse_if_too_big(plan, alternatives, live_option)


def _extract(model: str, dataset: str, out: str | Path, *, spec: str | CacheSpec, splits: list[str] | None,
             data_root: str | Path | None, weights: str | Path | None, pretrained: bool, preprocess: str,
             device: str, precision: str, batch_size: int, workers: int | None, limit: int | None, overwrite: bool,
             views: int, view_transform: str, frames: int | None, frame_stride: int | None,
             progress: ProgressSink | None, log: Callable[[str], None], warn: Callable[[str], None]) -> list[SplitReport]:
    target = Location(out)
    if launched_rank() == 0:  # under torchrun rank 0 alone touches the folder before the store exists
        target.check_writable()
        if target.is_local:
            recover(target.text)  # a replacement's swap that a crash cut short
    # --overwrite of a cache on a local disk builds the new one beside it and swaps it in when it
    # is complete: the old cache stays whole until then (on an object store it is deleted first)
    staged = overwrite and target.is_local and holds_cache(target)
    building = str(staging_path(target.text)) if staged else out
    cache_spec = spec if isinstance(spec, CacheSpec) else load_spec(spec)
    if views < 0 or view_transform not in VIEW_TRANSFORMS:
        raise SidetuneError(f"--views takes a count of at least 0 (got {views}) and --view-transform one of "
                            f"{', '.join(VIEW_TRANSFORMS)} (got {view_transform!r}).")
    torch_device, autocast_dtype = resolve_compute(device, precision)
    source = load_source(dataset, data_root=data_root, splits=splits, limit=limit,
                         sampling=frame_sampling(frames, frame_stride))
    if views and source.sampling is not None:
        raise SidetuneError("--views stores augmented views of images; a video dataset's clips have none. Leave "
                            "--views out for clips.")
    backbone = load_backbone(model, weights=weights, pretrained=pretrained)
    preprocessing = resolve_preprocessing(preprocess, backbone)
    clip_frames = source.sampling.frames if source.sampling is not None else 1
    token_layout = stored_layout(cache_spec, backbone).over_frames(clip_frames)
    stages, token_shape = token_layout.stages, token_layout.image_shape()
    plan = _plan(out, cache_spec, source, backbone, splits, building, views)
    if launched_rank() == 0:
        _refuse_unless_it_fits(plan, cache_spec, source, backbone)

    dataset_record = {**source.describe(), "argument": dataset, "data_root": None if data_root is None else str(data_root)}
    manifest = build_manifest(
        backbone=backbone.describe(),
        preprocessing=preprocessing.describe(),
        dataset=dataset_record,
        spec=cache_spec.describe(),
        stage_shapes=[shape.describe() for shape in token_layout.shapes],
        frames=clip_frames,
        compute={"precision": precision_name(autocast_dtype), "device": torch_device.type, "batch_size": batch_size},
        views=None if not views else {"count": views, **ViewTransform(view_transform, preprocessing.size,
                                      preprocessing.interpolation, preprocessing.mean, preprocessing.std).describe(),
                                      "splits": sorted(split.name for split in plan.splits if split.views)},
    )
    world = current_world(torch_device)
    torch_device = world.device(torch_device)
    with contextlib.ExitStack() as locks:
        if world.is_main:  # the cache, and the replacement being built beside it
            for place in dict.fromkeys([out, building]):
                locks.enter_context(Location(place).exclusive(LOCK_FILE, "sidetune extract"))
        if world.is_main:  # rank 0 creates (or verifies) the store, the manifest and every split's arrays
            writer = CacheWriter.open(building, manifest, overwrite=overwrite and not staged, replace_other=staged)
            norm = backbone.final_norm()
            if norm is not None:
                writer.write_backbone_params({
                    "final_norm_weight": norm.weight.detach().cpu().numpy(),
                    "final_norm_bias": norm.bias.detach().cpu().numpy(),
                })
            for note in (*backbone.notes, *source.notes):
                log(f"note: {note}")
            for warning in source.warnings:
                warn(warning)
            log(plan.describe())
        world.barrier()
        if not world.is_main:
            writer = CacheWriter.attach(building, manifest)

        backbone.model.to(torch_device)
        workers = default_workers(torch_device) if workers is None else workers
        progress = progress if progress is not None and world.is_main else ProgressSink()
        reports = []
        for planned in plan.splits:
            name, split = planned.name, source.splits[planned.name]
            if planned.kind != "stored":
                kept = None
                if world.is_main:
                    if planned.kind == "view":
                        kept = writer.view(name, planned.parent, planned.rows, split.labels)
                    else:
                        kept = writer.live(name, split.labels, split.fingerprint())
                    if kept != planned.kind:
                        log(f"{name}: already {kept} in the cache, kept so")
                kept = world.broadcast(kept)
                reports.append(SplitReport(name, len(split), 0, 0, 0.0, True, kept))
                continue
            arrays = (name, split.labels, token_shape, cache_spec.codec().stored_dtype, cache_spec.chunk_images,
                      cache_spec.shard_images, cache_spec.compressor, cache_spec.codec().scale_shape(token_shape),
                      len(stages))
            complete = False
            if world.is_main:
                split_writer = writer.split(*arrays, views=planned.views)  # creates the split's arrays, or reopens them
                complete = _check_written_shards(name, split_writer, writer, log)
            if world.broadcast(complete):
                reports.append(SplitReport(name, len(split), 0, 0, 0.0, True))
                continue
            world.barrier()
            if not world.is_main:
                split_writer = writer.open_split(name, len(split), cache_spec.shard_images)
            try:
                reports.append(_extract_split(
                    name, split, split_writer, writer, backbone, preprocessing, cache_spec, token_layout,
                    torch_device, autocast_dtype, batch_size, workers, progress, world, view_transform,
                ))
            except KeyboardInterrupt:
                done = split_writer.num_shards - len(split_writer.pending_shards())
                kept = f"{building} (the cache at {out} stays as it was until the new one is complete)" if staged else out
                raise Interrupted(f"Extraction interrupted in split {name}: {done} of its {split_writer.num_shards} "
                                  f"shards are written and kept in {kept}; rerun the same command to compute only "
                                  "the rest.") from None
        world.barrier()
        if staged and world.is_main and all(report.complete for report in reports):
            swap_in(target.text)
            log(f"the new cache replaced the old one at {out}")
    return reports


def _check_written_shards(name: str, split_writer: SplitWriter, writer: CacheWriter, log: Callable[[str], None]) -> bool:
    """Read back every shard marked written and mark the damaged ones (missing, truncated,
    holding other values: sidetune/cache/integrity.py) for computing again. Returns whether the
    split is complete and sound, so that nothing is left to compute."""
    damaged = split_writer.damaged_shards(read=True)
    split_writer.recompute(sorted(set(damaged) | set(split_writer.pending_shards())))  # what a killed write left goes too
    if damaged:
        listed = ", ".join(f"{shard} ({what})" for shard, what in sorted(damaged.items()))
        log(f"{name}: {len(damaged)} damaged shard{'s' if len(damaged) > 1 else ''}, computed again: {listed}")
        if writer.is_complete(name):
            writer.reopen(name)
        return False
    if writer.is_complete(name):
        log(f"{name}: already complete, every shard checked, skipped")
        return True
    return False


def _extract_split(name: str, split: ImageSplit, split_writer: SplitWriter, writer: CacheWriter,
                   backbone: Backbone, preprocessing: Preprocessing, spec: CacheSpec, token_layout: TokenLayout,
                   device: torch.device, autocast_dtype: torch.dtype | None, batch_size: int,
                   workers: int, progress: ProgressSink, world: World, view_transform: str = "vpt") -> SplitReport:
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
        for start, stop in batch_bounds(*split_writer.shard_bounds(shard), batch_size)
    ]
    view_count = split_writer.group["views"].shape[1] if "views" in split_writer.group else 0
    views = None
    if view_count:  # each view seeded by the image's identity and its index: the same bytes however it is run
        views = ViewTransform(view_transform, preprocessing.size, preprocessing.interpolation, preprocessing.mean,
                              preprocessing.std)
        seeds = [[view_seed(key, view) for view in range(view_count)] for key in split.keys()]
    dataset = ImageDataset(split, preprocessing.transform(), views, seeds if views else None)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        multiprocessing_context=dataset.worker_context if workers else None,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    # Under torchrun, rank 0's bar counts the shards every rank has written (total throughput).
    watching = world.size > 1 and world.is_main  # the other ranks show no progress: no need to poll
    monitor = ShardMonitor(split_writer, all_pending, progress) if watching else contextlib.nullcontext()
    with monitor:
        with _ShardWriterThread(split_writer) as shard_writer, torch.inference_mode():
            assembler = _ShardAssembler(split_writer, pending)
            for images, indices, errors in loader:
                if errors:
                    raise SidetuneError(
                        f"Could not read image {errors[0]}. Fix or remove it (and its line in the list "
                        "file, if any), then rerun the same command: finished shards are kept."
                    )
                view_images = None
                if views is not None:
                    images, view_images = images
                with autocast(device, autocast_dtype):  # the forward only: CPU autocast refuses cat of float16
                    stacked = stored_tokens(backbone, spec, token_layout, images.to(device, non_blocking=True))
                    viewed = None if view_images is None else torch.stack(
                        [stored_tokens(backbone, spec, token_layout, view_images[:, view].to(device, non_blocking=True))
                         for view in range(view_count)], 1)  # (B, V, ...): one forward of B images per view
                absmax = stage_absmax(stacked, token_layout).float().cpu().numpy()
                _check_range(stacked, absmax, spec, token_layout, name, split, indices)
                arrays = dict(zip(("tokens", "scales"), (None if t is None else t.cpu() for t in spec.codec().encode(stacked))))
                if viewed is not None:
                    flat = viewed.flatten(0, 1)
                    view_absmax = stage_absmax(flat, token_layout).float().cpu().numpy()
                    _check_range(flat, view_absmax, spec, token_layout, name, split, [i for i in indices for _ in range(view_count)])
                    absmax = np.maximum(absmax, view_absmax)
                    encoded = [None if t is None else t.cpu().unflatten(0, viewed.shape[:2]) for t in spec.codec().encode(flat)]
                    arrays.update(views=encoded[0], view_scales=encoded[1])
                for shard, shard_absmax, shard_arrays in assembler.add(indices, absmax, **arrays):
                    shard_writer.submit(shard, shard_absmax, shard_arrays)
                if world.size == 1:
                    progress.advance(len(indices))
        world.barrier()  # every rank's shards are written (its writer thread has drained)
    complete = world.broadcast(writer.finish_split(split_writer) if world.is_main else None)
    skipped = split_writer.num_shards - len(all_pending)
    return SplitReport(name, len(split), len(pending), skipped, time.perf_counter() - started, complete)


def _check_range(stacked: torch.Tensor, absmax: np.ndarray, spec: CacheSpec, layout: TokenLayout,
                 split_name: str, split: ImageSplit, indices: list[int]) -> None:
    if not np.isfinite(absmax).all():
        bad_stage = layout.shapes[int(np.flatnonzero(~np.isfinite(absmax))[0])].label
        bad_image = indices[int(torch.nonzero(~torch.isfinite(stacked).flatten(1).all(1))[0])]
        raise SidetuneError(
            f"The backbone produced non-finite values at {bad_stage} for {split.describe(bad_image)} "
            f"in split {split_name}. With --precision fp16 this is overflow: use --precision bf16 or fp32."
        )
    codec = spec.codec()
    limit = codec.overflow_limit
    if limit is not None and absmax.max() > limit:
        bad = [f"{layout.shapes[i].label} (max |x| = {absmax[i]:.4g})" for i in np.flatnonzero(absmax > limit)]
        read_as = str(codec.decoded_dtype).removeprefix("torch.")
        raise SidetuneError(
            f"Activations overflow {read_as} in split {split_name}: {', '.join(bad)} exceed {limit:.0f}. "
            "Nothing was stored as inf. Use a cache spec with dtype: bfloat16 or float32 (and --overwrite)."
        )


class ShardMonitor:
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

    def __enter__(self) -> "ShardMonitor":
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
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.absmax: np.ndarray | None = None
        self.filled = 0

    def add(self, indices: list[int], absmax: np.ndarray, **arrays: torch.Tensor | None
            ) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
        """A batch's `arrays` (tokens, and scales, views, view_scales where there are any);
        yields (shard, absmax, its arrays) each time a shard is whole."""
        shard = self.pending[0]
        start, stop = self.writer.shard_bounds(shard)
        if indices[0] != start + self.filled:
            raise RuntimeError(f"batch starting at image {indices[0]} arrived out of order for shard {shard}")
        for name, array in arrays.items():
            if array is not None:
                self.parts.setdefault(name, []).append(array)
        self.absmax = absmax if self.absmax is None else np.maximum(self.absmax, absmax)
        self.filled += len(indices)
        if self.filled == stop - start:
            yield shard, self.absmax, {name: torch.cat(parts).numpy() for name, parts in self.parts.items()}
            self.pending.pop(0)
            self.parts, self.absmax, self.filled = {}, None, 0


class _ShardWriterThread:
    """Writes finished shards in the background so compute never waits for the disk; at most
    two shards are in flight. Errors surface on the next submit or on exit."""

    def __init__(self, writer: SplitWriter):
        self.writer = writer
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidetune-writer")
        self.inflight: list[Future] = []

    def submit(self, shard: int, absmax: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        while len(self.inflight) >= 2:
            self.inflight.pop(0).result()
        self.inflight.append(self.executor.submit(self.writer.write_shard, shard, absmax=absmax, **arrays))

    def __enter__(self) -> "_ShardWriterThread":
        return self

    def __exit__(self, *exc) -> None:
        try:
            for future in self.inflight:
                future.result()
        finally:
            self.executor.shutdown(wait=True)


def default_cache_path(dataset: str) -> Path:
    """Where `extract` writes when no --out is given: ./cache/<dataset name>."""
    return Path("cache") / Path(dataset.removeprefix("hf:")).name
