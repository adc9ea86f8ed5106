"""The C library's allocator, tuned for training steps that allocate and free tens of MB each
(the command line does this at start). Importing it imports nothing heavy."""

from __future__ import annotations

import ctypes
import os
import platform

# glibc mallopt parameters, and what `keep_freed_memory` sets them to
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 256 << 20}
MALLOC_SWITCH = "SIDETUNE_MALLOC"  # "default": leave the C library's allocator as it is


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next training step instead of handing it
    back to the system: blocks up to 32 MiB come from the heap (not a fresh mmap each), and up
    to 1 GiB of free heap is kept (not trimmed) with 256 MiB of headroom. A CPU training step
    allocates and frees tens of MB of activations; by default each step maps and page-faults
    them again (docs/benchmarks.md: 10x fewer page faults, a sweep 10-20% faster). The cost is
    that the process keeps its peak memory. The command line calls this at start; set
    SIDETUNE_MALLOC=default to skip it. Returns whether the settings were applied (only with
    glibc)."""
    if os.environ.get(MALLOC_SWITCH) == "default" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in MALLOC_SETTINGS.items())
