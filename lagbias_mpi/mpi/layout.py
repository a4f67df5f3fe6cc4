"""Slab decomposition arithmetic: pure functions, no MPI.

A grid of ``n`` planes (along the first axis) is cut into ``size`` contiguous slabs. Rank ``r`` holds
planes ``[start, stop)``. The first ``n % size`` ranks hold one plane more than the others, which is
the distribution mpi4py-fft uses, so our slabs and the FFT's slabs coincide. When ``size > n`` the
ranks ``r >= n`` hold no plane.
"""
from __future__ import annotations

import numpy as np


def slab_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Return ``(start, stop)`` of the planes owned by ``rank`` for ``n`` planes over ``size`` ranks."""
    if n < 0 or size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad slab query n={n}, size={size}, rank={rank}")
    q, r = divmod(n, size)
    start = q * rank + min(rank, r)
    stop = start + q + (1 if rank < r else 0)
    return start, stop


def slab_starts(n: int, size: int) -> np.ndarray:
    """Start plane of every rank, plus ``n`` at the end: an array of ``size + 1`` edges."""
    q, r = divmod(n, size)
    ranks = np.arange(size + 1)
    return q * ranks + np.minimum(ranks, r)


def slab_counts(n: int, size: int) -> np.ndarray:
    """Number of planes held by each rank."""
    return np.diff(slab_starts(n, size))


def plane_owner(plane, n: int, size: int):
    """Rank owning global plane index ``plane`` (scalar or array, taken modulo ``n``)."""
    plane = np.mod(np.asarray(plane, dtype=np.int64), n)
    q, r = divmod(n, size)
    # planes [0, r*(q+1)) belong to the first r ranks with q+1 planes each
    big = r * (q + 1)
    if q == 0:
        owner = plane  # every plane has its own rank (size > n)
    else:
        owner = np.where(plane < big, plane // (q + 1), r + (plane - big) // q)
    return owner.astype(np.int64) if owner.ndim else int(owner)


def next_nonempty_rank(n: int, size: int, rank: int) -> int:
    """Rank that owns the plane right after the slab of ``rank`` (periodic); its CIC ghost target."""
    _, stop = slab_bounds(n, size, rank)
    return plane_owner(stop % n, n, size) if n else rank


def plane_transfer(start: int, stop: int, starts, stops) -> tuple[np.ndarray, np.ndarray]:
    """Planes of the slab ``[start, stop)`` that each rank's slab ``[starts[r], stops[r])`` of another
    layout of the same grid holds: ``(counts, offsets)`` per rank, offsets counted from ``start``
    (0 where the count is 0). Used both ways when a field moves between two slab layouts: against the
    destination slabs it gives what to send, against the source slabs what to receive."""
    starts, stops = np.asarray(starts, np.int64), np.asarray(stops, np.int64)
    if starts.shape != stops.shape or np.any(stops < starts) or stop < start:
        raise ValueError(f"bad slabs [{start}, {stop}) vs {starts.tolist()}..{stops.tolist()}")
    lo, hi = np.maximum(start, starts), np.minimum(stop, stops)
    counts = np.maximum(0, hi - lo)
    return counts, np.where(counts > 0, lo - start, 0)
