"""Feature-space augmentation: what caching leaves of image augmentation.

c²FroFA brightness (Bär et al., "Frozen Feature Augmentation for Few-Shot Image
Classification", CVPR 2024; reconstructed from the paper, docs/methods.md says what is ours):
on every training batch, each stage a side network reads has its patch tokens (prefix tokens
untouched) min-max mapped to [0, 1] per channel, with each channel's minimum and maximum over
the training split's patch tokens; each channel of each image is brightened by its own factor,
clip(f' (1 + v), 0, 1) with v ~ U(-m, m); and the result is mapped back. Evaluation reads the
features untouched.

The draws come from one generator per (data seed, epoch): configurations that share a data
seed see the same augmented batches, whichever others share their stack (the stack's input
stays one tensor, shared), and a run is reproducible. Magnitude 0 is no augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from sidetune.cache.layout import unpack_stages
from sidetune.errors import SidetuneError

AUGMENTATIONS = ("none", "frofa-brightness")


def check_augmentation(name: str, magnitude: float) -> None:
    if name not in AUGMENTATIONS:
        raise SidetuneError(f"Unknown augmentation '{name}'. Choose one of: {', '.join(AUGMENTATIONS)}.")
    if not 0 <= magnitude <= 1:
        raise SidetuneError(f"--augment-magnitude got {magnitude}; it must be between 0 and 1 (brightness factors "
                            "1 + v with v uniform in [-magnitude, magnitude]).")


@dataclass
class BrightnessAugmentation:
    """c²FroFA brightness on batches of the stages with `shapes` ((tokens, width) each, in
    batch order) and `prefix` tokens; `low` and `high` hold each stage's per-channel range."""

    magnitude: float
    shapes: list[tuple[int, int]]
    prefix: int
    low: list[torch.Tensor]
    high: list[torch.Tensor]

    @classmethod
    def fit(cls, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], shapes: Sequence[tuple[int, int]],
            prefix: int, magnitude: float) -> "BrightnessAugmentation":
        """Per-channel minima and maxima of each stage's patch tokens over the training split."""
        low: list[torch.Tensor] | None = None
        high: list[torch.Tensor] | None = None
        for tokens, _ in batches:
            patches = [x[:, prefix:].float() for x in unpack_stages(tokens, shapes)]
            batch_low, batch_high = [x.amin(dim=(0, 1)) for x in patches], [x.amax(dim=(0, 1)) for x in patches]
            low = batch_low if low is None else [torch.minimum(a, b) for a, b in zip(low, batch_low)]
            high = batch_high if high is None else [torch.maximum(a, b) for a, b in zip(high, batch_high)]
        return cls(magnitude, list(shapes), prefix, low, high)

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """An augmented copy of a training batch ((B, S, T, D) or flat (B, E))."""
        if self.magnitude == 0:
            return tokens
        out = tokens.clone()
        for x, low, high in zip(unpack_stages(out, self.shapes), self.low, self.high):  # views into `out`
            patches = x[:, self.prefix:].float()
            span = (high - low).clamp_min(torch.finfo(torch.float32).tiny)
            factors = 1 + (torch.rand(x.shape[0], 1, x.shape[2], generator=generator, device=x.device) * 2 - 1) * self.magnitude
            mapped = ((patches - low) / span * factors).clamp_(0, 1)
            x[:, self.prefix:] = (mapped * span + low).to(x.dtype)
        return out


def augmentation_generator(data_seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of an epoch's augmentation draws: a function of the data seed and epoch only."""
    return torch.Generator(device=device).manual_seed(data_seed * 1_000_003 + epoch + 7_919)
