"""The C heap under numpy: large temporaries go back to the system when freed.

glibc serves an allocation from its heap below a threshold and with ``mmap`` above it; the
threshold is dynamic and climbs to 32 MiB after the first large block is freed, so the chunked
temporaries of the pipeline (a few to tens of MB each) then land in the heap, where freed memory
stays resident until the top of the heap is free. :func:`tune_malloc` fixes the threshold at 1 MiB
(every array of 1 MiB or more is mapped and unmapped on its own) and :func:`release_heap` asks
glibc to return the heap's free pages (called at the start of every timed stage). Both do nothing
where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # bytes: allocations from here on are mapped on their own

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def tune_malloc(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (and its trim threshold at 4 x that);
    True when applied."""
    lib = _glibc()
    if lib is None:
        return False
    return bool(lib.mallopt(M_MMAP_THRESHOLD, int(threshold))) and bool(lib.mallopt(M_TRIM_THRESHOLD, 4 * int(threshold)))


def release_heap() -> bool:
    """Return the free pages of glibc's heap to the system (``malloc_trim(0)``); True if any were."""
    lib = _glibc()
    return bool(lib.malloc_trim(0)) if lib is not None else False


ROWS_PER_STEP = 1 << 16  # particles per step of every chunked per-particle computation: its
# temporaries (tens of bytes per row) stay a few MB, a fixed per-rank term that does not grow with
# the particles (a larger chunk would make them scale with the particle count of small boxes)
