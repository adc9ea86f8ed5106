"""Where and at what precision work runs: one rule for extraction, training and predict."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch

from sidetune.errors import SidetuneError

DEVICES = ("auto", "cpu", "cuda")
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *AUTOCAST_DTYPES)


def resolve_device(device: str) -> torch.device:
    """`auto`: CUDA when present, else the CPU."""
    if device not in DEVICES:
        raise SidetuneError(f"Unknown device '{device}'. Choose one of: {', '.join(DEVICES)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise SidetuneError("--device cuda was requested but no CUDA GPU is available. Use --device cpu or auto.")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def resolve_compute(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """`auto` device: CUDA when present. `auto` precision: bf16 autocast on CUDA, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise SidetuneError(f"Unknown precision '{precision}'. Choose one of: {', '.join(PRECISIONS)}.")
    resolved = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if resolved.type == "cuda" else "fp32"
    return resolved, AUTOCAST_DTYPES[precision]


def precision_name(autocast_dtype: torch.dtype | None) -> str:
    return {dtype: name for name, dtype in AUTOCAST_DTYPES.items()}[autocast_dtype]


def autocast(device: torch.device, autocast_dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to `autocast_dtype` on `device`, or full precision when it is None."""
    return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def proc_bytes(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a Linux /proc file in bytes, or None where there is none."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
