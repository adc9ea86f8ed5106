"""Every Triton kernel of sidetune is launched through `launch`, so that whoever wants to know
how many kernels a step launches can be told (benchmarks/launches.py counts a step's work)."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Callable

# Each observer is called with a kernel's name before it runs and returns a context manager
# entered for the duration of the launch.
observers: list[Callable[[str], AbstractContextManager]] = []


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """kernel[grid](*args, **meta), with every observer told."""
    with ExitStack() as stack:
        for observe in observers:
            stack.enter_context(observe(kernel.fn.__name__))
        kernel[grid](*args, **meta)
