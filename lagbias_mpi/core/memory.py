"""The C heap under numpy: large temporaries go back to the system when freed.

glibc serves an allocation from its heap below a threshold and with ``mmap`` above it; the
threshold is dynamic and climbs to 32 MiB after the first large block is freed, so the chunked
temporaries of the pipeline (a few to tens of MB each) then land in the heap, where freed memory
stays resident until the top of the heap is free. :func:`tune_malloc` fixes the threshold at 1 MiB
(every array of 1 MiB or more is mapped and unmapped on its own) and :func:`release_heap` asks
glibc to return the heap's free pages (called at the start of every timed stage). Both do nothing
where the C library is not glibc.

numpy asks the kernel for transparent huge pages (2 MiB) for every array of 4 MiB or more
(``madvise(MADV_HUGEPAGE)``): good for the FFTs (a 256^3 transform ~20% faster here), bad for an
array filled at many places at once, which is then resident 2 MiB per place. The result of an
exchange fills one front per source rank: at a few hundred ranks it became resident whole at the
first round, beside its still whole input (measured: 0.8 MB written at 256 fronts of an 80 MB
array made 80 MB resident with the hint, 1.8 MB without). Such arrays are allocated inside
:func:`small_pages`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # bytes: allocations from here on are mapped on their own

_libc = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
            if _libc and hasattr(lib, "mallinfo2"):
                lib.mallinfo2.restype = _MallInfo2
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


def numpy_hugepages(enabled: bool) -> bool | None:
    """Set whether numpy asks for transparent huge pages for new large arrays (its
    ``_set_madvise_hugepage``; the ``NUMPY_MADVISE_HUGEPAGE`` environment variable sets the same
    at import); returns the previous setting, None where this numpy has no such switch."""
    import numpy as np

    core = getattr(np, "_core", None) or getattr(np, "core", None)
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    return None if setter is None else bool(setter(bool(enabled)))


@contextmanager
def small_pages():
    """Numpy arrays allocated inside get ordinary 4 KiB pages (no huge-page hint): for arrays filled
    at many places at once, which then hold what has been written (the exchanges' results)."""
    previous = numpy_hugepages(False)
    try:
        yield
    finally:
        if previous is not None:
            numpy_hugepages(previous)


def heap_in_use_bytes() -> int | None:
    """Bytes of glibc's main heap in live allocations (``mallinfo2().uordblks``): what C and C++
    libraries hold below the mmap threshold (the arrays above it are mapped on their own), for
    finding a library cache that keeps memory after a stage. None without glibc 2.33+."""
    info = heap_info()
    return None if info is None else info["in_use"]


def heap_info() -> dict | None:
    """glibc's allocator in bytes (``mallinfo2``): ``heap`` (the main heap's size, what it holds
    resident at most), ``in_use`` (its live allocations), ``mapped`` (blocks mapped on their own, the
    arrays above the mmap threshold). None without glibc 2.33+."""
    lib = _glibc()
    if lib is None or not hasattr(lib, "mallinfo2"):
        return None
    info = lib.mallinfo2()
    return {"heap": int(info.arena), "in_use": int(info.uordblks), "mapped": int(info.hblkhd)}


def release_heap() -> bool:
    """Return the free pages of glibc's heap to the system (``malloc_trim(0)``); True if any were."""
    lib = _glibc()
    return bool(lib.malloc_trim(0)) if lib is not None else False


ROWS_PER_STEP = 1 << 16  # particles per step of every chunked per-particle computation: its
# temporaries (tens of bytes per row) stay a few MB, a fixed per-rank term that does not grow with
# the particles (a larger chunk would make them scale with the particle count of small boxes)
