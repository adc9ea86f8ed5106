"""How tokens are stored: a float type, or int8 with float32 scales (per token or per channel
of each image and stage), decoded to float16 on the device that reads them.

One scale per channel gives every channel its own range (ViT activations have outlier
channels), but it is set by the largest token: a CLS token much smaller than the patch tokens
then loses most of its bits (7% error at the last stage of a random test_vit, against 0.6% with
one scale per token). Per token is the default; docs/benchmarks.md measures both."""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT8_SCALES = ("token", "channel")
DECODED_DTYPE = torch.float16


@dataclass(frozen=True)
class Codec:
    """`dtype`: the stored type (float16, bfloat16, float32 or int8); `scale`: for int8, which
    axis shares a scale ('channel': one per channel over an image's tokens; 'token': one per
    token over its channels)."""

    dtype: str
    scale: str = "token"

    @property
    def quantized(self) -> bool:
        return self.dtype == "int8"

    def scale_shape(self, token_shape: tuple[int, int, int]) -> tuple[int, int, int] | None:
        """Per-image shape of the scales for tokens of per-image shape (S, T, D); None for floats."""
        if not self.quantized:
            return None
        stages, tokens, width = token_shape
        return (stages, 1, width) if self.scale == "channel" else (stages, tokens, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, T, D) float32 -> stored tokens, and int8 scales (None for a float type)."""
        if not self.quantized:
            return x.to(getattr(torch, self.dtype)), None
        reduce = 2 if self.scale == "channel" else 3
        absmax = torch.maximum(x.amax(dim=reduce, keepdim=True), -x.amin(dim=reduce, keepdim=True))
        scales = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.round(x / scales).clamp_(-127, 127).to(torch.int8), scales

    def decode(self, tokens: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """Stored tokens (and scales) -> what side networks read: the float type as stored, or
        float16 for int8."""
        if scales is None:
            return tokens
        return (tokens * scales).to(DECODED_DTYPE)  # int8 x float32 -> float32, rounded once

    def decoded_dtype(self) -> torch.dtype:
        return DECODED_DTYPE if self.quantized else getattr(torch, self.dtype)
