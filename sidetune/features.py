"""The one path from images to the tokens a cache holds, shared by extraction, live evaluation
and `predict`: the image loader (decoding workers, batches that never straddle a shard, read
errors carried to the main process), the stored layout of a backbone's stages under a spec,
the tokens of a batch as stored, and as stage two reads them back."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset

from sidetune.backbones import Backbone
from sidetune.cache.layout import TokenLayout, pack_stages
from sidetune.cache.spec import CacheSpec
from sidetune.compute import autocast
from sidetune.datasets import ImageSplit
from sidetune.datasets.video import ClipSplit
from sidetune.errors import SidetuneError


def stored_layout(spec: CacheSpec, backbone: Backbone) -> TokenLayout:
    """The shapes of the stages `spec` keeps of `backbone`, as stored."""
    layout = spec.stored_layout(backbone.stages)
    if spec.codec().quantized and not layout.uniform:
        raise SidetuneError(
            f"Cache spec '{spec.name}' stores int8, which sidetune supports only where every kept stage has the "
            f"same tokens and width; {backbone.timm_name}'s stages differ "
            f"({', '.join(f'{s.num_tokens}x{s.width}' for s in layout.shapes)}). Use a float16 spec "
            "(e.g. --spec final, cnn-last2 or cnn-grid7)."
        )
    return layout


def stored_tokens(backbone: Backbone, spec: CacheSpec, layout: TokenLayout, images: torch.Tensor) -> torch.Tensor:
    """(B, S, T, D) (or flat (B, E), sidetune/cache/layout.py) float32 tokens of one batch, as a
    cache of `layout` stores them before the spec's codec encodes them (sums added in float32, in
    stage order). Extraction, live evaluation and `predict` all compute features here. A sum
    is accumulated as the backbone yields its stages, so a summed cache never holds them all.
    Clips (B, F, C, H, W) go through the backbone frame by frame, batched, and come out with each
    stage's frames one after another along its tokens (a video cache's layout)."""
    if images.dim() == 5:
        return layout.frames_into_tokens(stored_tokens(backbone, spec, layout, images.flatten(0, 1)))
    kept_at = {shape.stage: i for i, shape in enumerate(layout.shapes) if not shape.summed}
    summed_at = {stage: i for i, shape in enumerate(layout.shapes) for stage in shape.summed}
    outputs: list[torch.Tensor | None] = [None] * len(layout.shapes)
    wanted = layout.backbone_stages
    for stage, x in zip(wanted, backbone.forward(images, wanted)):
        x = spec.select_tokens(x, backbone.shape_of(stage)).float()
        if stage in summed_at:
            i = summed_at[stage]
            outputs[i] = x.clone() if outputs[i] is None else outputs[i].add_(x)
        if stage in kept_at:
            outputs[kept_at[stage]] = x
    return pack_stages(outputs)


def stage_absmax(tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(S,) max |x| of each stage of a packed batch, as max(max, -min): two reductions, no |x|
    copy (7x faster on CPU)."""
    if tokens.dim() == 4:
        return torch.maximum(tokens.amax(dim=(0, 2, 3)), -tokens.amin(dim=(0, 2, 3)))
    return torch.stack([torch.maximum(x.amax(), -x.amin()) for x in layout.unpack(tokens, layout.stages)])


def as_read_from_cache(backbone: Backbone, spec: CacheSpec, layout: TokenLayout, images: torch.Tensor,
                       autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """(B, S, T, D) tokens of one batch exactly as stage two reads them back from a cache:
    computed (at the cache's precision), encoded as stored, decoded. Live evaluation and
    `predict` feed side networks these."""
    with autocast(images.device, autocast_dtype):
        tokens = stored_tokens(backbone, spec, layout, images)
    codec = spec.codec()
    return codec.decode(*codec.encode(tokens))


class ImageDataset(Dataset):
    """A split's images through a transform, for a DataLoader: (image, index, None), or (None,
    index, what went wrong) for an image that cannot be read (named by the main process). A clip
    (a split whose items are frame lists) gives its frames as one (F, C, H, W) tensor. With
    `views` (a transform taking a seed) and each image's view seeds, the image is the pair
    (plain image, its augmented views (V, C, H, W))."""

    def __init__(self, split: ImageSplit, transform, views: Callable[[Image.Image, int], torch.Tensor] | None = None,
                 view_seeds: list[list[int]] | None = None):
        self.split = split
        self.transform = transform
        self.views, self.view_seeds = views, view_seeds

    def __len__(self) -> int:
        return len(self.split)

    @property
    def worker_context(self) -> str | None:
        """How its DataLoader starts workers: spawned for clips (FFmpeg's threads, which PyAV
        starts, do not survive a fork: a forked worker can hang), forked (the default) for images."""
        parts = getattr(self.split, "parts", [self.split])
        return "spawn" if any(isinstance(part, ClipSplit) for part in parts) else None

    def __getitem__(self, index: int):
        try:
            image = self.split.image(index)
            if isinstance(image, list):  # a clip's frames: (F, C, H, W)
                return torch.stack([self.transform(frame) for frame in image]), index, None
            plain = self.transform(image)
            if self.views is None:
                return plain, index, None
            return (plain, torch.stack([self.views(image, seed) for seed in self.view_seeds[index]])), index, None
        except Exception as error:  # reported by the main process with the file's name
            return None, index, f"{self.split.describe(index)} ({type(error).__name__}: {error})"


def collate_images(items):
    """(images (B, C, H, W) or None, indices, the errors of unreadable images); with views, the
    images are (plain (B, C, H, W), views (B, V, C, H, W))."""
    errors = [error for _, _, error in items if error is not None]
    if errors:
        return None, [index for _, index, _ in items], errors
    indices = [index for _, index, _ in items]
    if isinstance(items[0][0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*(image for image, _, _ in items))), indices, []
    return torch.stack([image for image, _, _ in items]), indices, []


def batch_bounds(start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """[begin, end) of each batch of images start..stop: batches never straddle `stop` (a shard's end)."""
    for begin in range(start, stop, batch_size):
        yield begin, min(begin + batch_size, stop)


def default_workers(device: torch.device) -> int:
    """Image-decoding worker processes: up to 8 feeding a GPU, half the cores (at most 4) on a CPU."""
    cpus = os.cpu_count() or 1
    return min(8, cpus) if device.type == "cuda" else max(0, min(4, cpus // 2))
