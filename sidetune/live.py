"""Live evaluation: a split kept out of the cache (VTAB-1k's test, by default) scored by running
its images through the backbone the cache records, at evaluation time.

Features are computed exactly as extraction computes them (sidetune/extract.py: the same
preprocessing, precision, batches within shards, stored type and decoding), so a live top-1
equals the top-1 from a cached copy of the split on the same machine. The backbone's weights
are checked against the manifest's hash and the images against the split's fingerprint;
`Cache.relocate` says where they are when they have moved. Training never comes here."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from sidetune.backbones import Preprocessing, load_recorded_backbone
from sidetune.cache.reader import Cache
from sidetune.compute import AUTOCAST_DTYPES
from sidetune.datasets import load_source
from sidetune.datasets.video import FrameSampling
from sidetune.errors import SidetuneError
from sidetune.features import ImageDataset, as_read_from_cache, batch_bounds, collate_images, default_workers
from sidetune.progress import ProgressSink


class LiveFeatures:
    """A live split's features, batch by batch, on `device` (the interface of the loader's
    feature classes: `labels`, `num_images`, `batches`)."""

    def __init__(self, cache: Cache, split: str, stages: Sequence[int], device: torch.device,
                 progress: ProgressSink | None = None):
        self.cache, self.name, self.device = cache, split, device
        self.progress = progress or ProgressSink()
        self.record = cache.split(split).record
        self.labels = torch.from_numpy(cache.split(split).labels).to(device)
        self.num_images = len(self.labels)
        self.spec = cache.info.spec
        self.layout = cache.token_layout
        self.positions = [self.layout.stages.index(stage) for stage in stages]
        self.sample_shape = self.layout.image_shape(stages)
        self.dtype = self.spec.codec().decoded_dtype

    def _images(self):
        record = self.cache.info.dataset
        data_root = self.cache.data_root or record.get("data_root")
        source = load_source(record["argument"], data_root=data_root, splits=[self.name], limit=record.get("limit"),
                             sampling=FrameSampling.from_record(record.get("frames")))
        images = source.splits[self.name]
        if images.fingerprint() != self.record["fingerprint"]:
            raise SidetuneError(
                f"The images of split {self.name} ({record['argument']}) are not those the cache {self.cache.path} "
                "recorded: files were added, removed, relabelled or changed since extraction. Restore them, point "
                "--data-root at the original copy, or extract the split again."
            )
        return images

    def batches(self, batch_size: int, shuffle: torch.Generator | None = None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The split in its stored order, in batches of `batch_size`. The backbone runs on
        extraction's batches (the spec's shards cut by extraction's batch size) so the features
        are the ones a cached copy holds."""
        if shuffle is not None:
            raise SidetuneError(f"Split {self.name} is live (not cached): it can be evaluated, not trained on.")
        images = self._images()
        manifest = self.cache.info
        backbone = load_recorded_backbone(manifest.backbone, self.cache.backbone_weights)
        backbone.model.to(self.device).eval()
        transform = Preprocessing.from_record(manifest.preprocessing).transform()
        shard, extract_batch = self.spec.shard_images, manifest.extract_batch_size
        bounds = [list(range(begin, end)) for start in range(0, self.num_images, shard)
                  for begin, end in batch_bounds(start, min(start + shard, self.num_images), extract_batch)]
        dataset, workers = ImageDataset(images, transform), default_workers(self.device)
        loader = DataLoader(dataset, batch_sampler=bounds, collate_fn=collate_images, num_workers=workers,
                            pin_memory=self.device.type == "cuda",
                            multiprocessing_context=dataset.worker_context if workers else None)
        precision = AUTOCAST_DTYPES[manifest.precision]
        pending: list[torch.Tensor] = []
        done = 0
        self.progress.start_split(f"{self.name} (live)", self.num_images, 0)
        with torch.inference_mode():
            for batch, indices, errors in loader:
                if errors:
                    raise SidetuneError(f"Could not read image {errors[0]} of live split {self.name}. Fix or restore it.")
                tokens = as_read_from_cache(backbone, self.spec, self.layout, batch.to(self.device), precision)
                pending.append(self.layout.select(tokens, self.positions))
                self.progress.advance(len(indices))
                while sum(len(t) for t in pending) >= batch_size:
                    merged = torch.cat(pending)
                    yield merged[:batch_size], self.labels[done:done + batch_size]
                    done += batch_size
                    pending = [merged[batch_size:]]
            if pending and sum(len(t) for t in pending):
                merged = torch.cat(pending)
                yield merged, self.labels[done:done + len(merged)]
