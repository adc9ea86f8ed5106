"""How tokens are stored: a float type, or int8 with float32 scales (per token or per channel
of each image and stage), decoded to float16 on the device that reads them.

A codec is one class that knows itself: the array type zarr stores, its bytes per element, the
bytes one image takes (for the disk plan and the memory budget), the largest value what side
networks read can hold, and how to encode and decode, with torch on the device and with numpy
on the host. Each is registered once in `CODECS` under the name a cache spec's `dtype` gives;
`codec_for` is the one way to get one. A new codec is a class here and its registration.

One scale per channel gives every channel its own range (ViT activations have outlier
channels), but it is set by the largest token: a CLS token much smaller than the patch tokens
then loses most of its bits (7% error at the last stage of a random test_vit, against 0.6% with
one scale per token). Per token is the default; docs/benchmarks.md measures both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from sidetune.errors import SidetuneError

INT8_SCALES = ("token", "channel")
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Codec:
    """The base of every codec. `scale` matters to int8 only: which axis shares a scale
    ('channel': one per channel over an image's tokens; 'token': one per token over its channels)."""

    scale: str = "token"

    name: ClassVar[str]  # the cache spec's `dtype`
    stored_dtype: ClassVar[str]  # the numpy / zarr type of the tokens array
    decoded_dtype: ClassVar[torch.dtype]  # what side networks read
    overflow_limit: ClassVar[float | None]  # the largest |x| what they read holds; None: float32's range
    quantized: ClassVar[bool] = False  # whether float32 scales are stored beside the tokens

    @property
    def dtype(self) -> str:
        return self.name

    @property
    def itemsize(self) -> int:
        """Bytes per stored token element."""
        return np.dtype(self.stored_dtype).itemsize

    def scale_shape(self, token_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """Per-image shape of the scales for tokens of per-image shape (S, T, D); None when none."""
        return None

    def image_nbytes(self, token_shape: tuple[int, ...]) -> int:
        """Bytes one image of per-image token shape `token_shape` takes as stored (tokens and scales)."""
        scale_shape = self.scale_shape(token_shape)
        scales = int(np.prod(scale_shape)) * 4 if scale_shape else 0
        return int(np.prod(token_shape)) * self.itemsize + scales

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, ...) float tokens -> tokens as stored, and the scales (None when none)."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """Stored tokens (and scales) -> what side networks read, as `decoded_dtype`."""
        raise NotImplementedError

    def decode_numpy(self, tokens: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
        """`decode` on the host, with the same arithmetic (bfloat16, which numpy lacks, as float32)."""
        raise NotImplementedError


CODECS: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.name] = cls
    return cls


def codec_for(dtype: str, scale: str = "token") -> Codec:
    """The codec a cache spec's `dtype` (and int8 `scale`) names."""
    if dtype not in CODECS:
        raise SidetuneError(f"Unknown cache dtype {dtype!r}; choose one of {', '.join(CODECS)}.")
    return CODECS[dtype](scale)


@dataclass(frozen=True)
class FloatCodec(Codec):
    """Tokens stored in a float type, read as stored."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x.to(self.decoded_dtype), None

    def decode(self, tokens: torch.Tensor, scales: None) -> torch.Tensor:
        return tokens

    def decode_numpy(self, tokens: np.ndarray, scales: None) -> np.ndarray:
        return tokens


@register
@dataclass(frozen=True)
class Float16(FloatCodec):
    name = "float16"
    stored_dtype = "float16"
    decoded_dtype = torch.float16
    overflow_limit = FLOAT16_MAX


@register
@dataclass(frozen=True)
class Float32(FloatCodec):
    name = "float32"
    stored_dtype = "float32"
    decoded_dtype = torch.float32
    overflow_limit = None


@register
@dataclass(frozen=True)
class BFloat16(Codec):
    """bfloat16 has float32's range in 16 bits. numpy and zarr have no bfloat16, so its bits are
    stored as int16 and reinterpreted on decoding."""

    name = "bfloat16"
    stored_dtype = "int16"
    decoded_dtype = torch.bfloat16
    overflow_limit = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x.to(torch.bfloat16).view(torch.int16), None

    def decode(self, tokens: torch.Tensor, scales: None) -> torch.Tensor:
        return tokens.view(torch.bfloat16)

    def decode_numpy(self, tokens: np.ndarray, scales: None) -> np.ndarray:
        return (tokens.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # exact


@register
@dataclass(frozen=True)
class Int8(Codec):
    """int8 with a float32 scale per token or per channel, read as float16."""

    name = "int8"
    stored_dtype = "int8"
    decoded_dtype = torch.float16
    overflow_limit = FLOAT16_MAX  # decoded to float16
    quantized = True

    def scale_shape(self, token_shape: tuple[int, ...]) -> tuple[int, int, int]:
        stages, tokens, width = token_shape
        return (stages, 1, width) if self.scale == "channel" else (stages, tokens, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reduce = 2 if self.scale == "channel" else 3
        absmax = torch.maximum(x.amax(dim=reduce, keepdim=True), -x.amin(dim=reduce, keepdim=True))
        scales = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.round(x / scales).clamp_(-127, 127).to(torch.int8), scales

    def decode(self, tokens: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return (tokens * scales).to(torch.float16)  # int8 x float32 -> float32, rounded once

    def decode_numpy(self, tokens: np.ndarray, scales: np.ndarray) -> np.ndarray:
        return (tokens * scales).astype(np.float16)
