"""Fused kernels behind torch custom ops: the low-rank attention chain of LAST and MIST
(`chain.py`: torch reference `chain_reference.py`, Triton `chain_triton.py`) and the stacked
AdamW (`adamw.py`, Triton `adamw_triton.py`).

Each op's torch implementation runs everywhere; `fused` selects the Triton kernels, which run
on a CUDA GPU, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is first imported: slow, for checking the kernels)."""

from __future__ import annotations

import importlib.util
import os

import torch

from sidetune.errors import SidetuneError


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (on CPU tensors) in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_bound(device: torch.device) -> bool:
    """Whether a step on `device` is bound by arithmetic rather than by kernel launches: on a
    CPU, where some computations skip half their work at the cost of a few ops per module. Under
    Triton's interpreter CPU tensors stand in for a GPU's, so they take the GPU's way."""
    return device.type == "cpu" and not interpreting()


def check_fused(device: torch.device) -> None:
    """Refuse `fused` kernels where they cannot run, naming the fix."""
    if importlib.util.find_spec("triton") is None:
        raise SidetuneError("--fused needs Triton, which is not installed (it comes with PyTorch's CUDA builds: "
                            "pip install triton). Train without --fused.")
    if device.type != "cuda" and not interpreting():
        raise SidetuneError(f"--fused runs Triton kernels on a CUDA GPU; this run is on {device.type}. Train without "
                            "--fused (the CPU runs the same computation in torch), or on --device cuda.")
