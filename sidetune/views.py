"""Augmented views of training images, for caches that store them (`extract --views N`).

A cache of one view per image cannot reproduce training with data augmentation; one that
stores N augmented views of every training image can: stage two draws one of them per image per
epoch (sidetune/training/data.py). Each view is drawn from a generator seeded by the image's
identity (its key: path and label, or pixels) and the view's index, never by a process's random
state, so a resumed, re-sharded or distributed extraction writes the same bytes.

Transforms, at the backbone's input size S x S (224 for ViT-B/16), with the cache's
preprocessing's interpolation, mean and std:
  vpt     VPT's FGVC training transform (KMnP/vpt, src/data/transforms.py): resize the shorter
          side to S·256/224, a random S x S crop, a horizontal flip with probability 1/2.
  dinov2  DINOv2's linear-evaluation training transform (facebookresearch/dinov2,
          data/transforms.py): RandomResizedCrop(S, scale 0.08-1, ratio 3/4-4/3), a flip."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from PIL import Image

VIEW_TRANSFORMS = ("vpt", "dinov2")


def view_seed(key: str, view: int) -> int:
    """The seed of view `view` of the image whose identity is `key`."""
    return zlib.crc32(f"{key}|view{view}".encode())


@dataclass(frozen=True)
class ViewTransform:
    """Makes view `v` of an image: a seeded random crop and flip, then the tensor the backbone
    reads (normalised with `mean`, `std`)."""

    kind: str
    size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        generator = torch.Generator().manual_seed(seed)
        mode = InterpolationMode(self.interpolation)
        height, width = self.size
        if self.kind == "vpt":
            image = TF.resize(image, round(min(height, width) * 256 / 224), interpolation=mode)
            top = int(torch.randint(image.height - height + 1, (1,), generator=generator))
            left = int(torch.randint(image.width - width + 1, (1,), generator=generator))
            image = TF.crop(image, top, left, height, width)
        else:
            top, left, crop_height, crop_width = random_resized_crop(image.width, image.height, generator)
            image = TF.resized_crop(image, top, left, crop_height, crop_width, [height, width], interpolation=mode)
        if float(torch.rand((1,), generator=generator)) < 0.5:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def describe(self) -> dict:
        return {"transform": self.kind, "seeded_by": "crc32 of the image's key and the view's index"}


def random_resized_crop(width: int, height: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop as torchvision's RandomResizedCrop draws it (an area
    fraction in `scale`, a log-uniform aspect ratio in `ratio`, ten tries, then the centre crop
    of the nearest admissible ratio), from `generator`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(*scale, generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=generator)))
        crop_width, crop_height = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width
