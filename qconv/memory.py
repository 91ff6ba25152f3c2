"""Process-level memory hygiene for long layer-by-layer runs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim() -> bool:
    """Give memory freed by the last layer back to the OS (glibc ``malloc_trim``).

    glibc raises its mmap threshold dynamically after large blocks are freed, so later per-layer temporaries land
    in the heap, fragment it, and RSS ratchets up layer after layer instead of staying at "one layer". Trimming
    once per layer releases those pages without slowing every allocation down. False where there is no glibc.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def available_memory() -> int:
    """Bytes of RAM the OS could give this process now (``MemAvailable``; total RAM where /proc is missing)."""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
