"""Slab layout arithmetic (pure functions): exhaustive over small N and P."""
import numpy as np
import pytest

from lagbias_mpi.mpi.layout import (
    next_nonempty_rank,
    plane_owner,
    slab_bounds,
    slab_counts,
    slab_starts,
)


@pytest.mark.parametrize("n", range(0, 14))
@pytest.mark.parametrize("size", range(1, 9))
def test_slabs_tile_the_grid(n, size):
    bounds = [slab_bounds(n, size, r) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (a0, b0), (a1, _) in zip(bounds[:-1], bounds[1:]):
        assert b0 == a1  # contiguous, in rank order
    counts = [b - a for a, b in bounds]
    assert max(counts) - min(counts) <= 1  # balanced
    assert counts == sorted(counts, reverse=True)  # the first n % size ranks hold one more
    assert sum(c == 0 for c in counts) == max(size - n, 0)  # P > N: exactly P - N empty ranks
    np.testing.assert_array_equal(slab_starts(n, size), [a for a, _ in bounds] + [n])
    np.testing.assert_array_equal(slab_counts(n, size), counts)


@pytest.mark.parametrize("n", range(1, 14))
@pytest.mark.parametrize("size", range(1, 9))
def test_plane_owner_consistent_with_slab_bounds(n, size):
    planes = np.arange(n)
    owners = plane_owner(planes, n, size)
    for rank in range(size):
        start, stop = slab_bounds(n, size, rank)
        np.testing.assert_array_equal(np.flatnonzero(owners == rank), np.arange(start, stop))
        for p in range(start, stop):
            assert plane_owner(p, n, size) == rank  # scalar form gives the same
            assert isinstance(plane_owner(p, n, size), int)
    # periodic: plane indices are taken modulo n
    np.testing.assert_array_equal(plane_owner(planes + n, n, size), owners)
    np.testing.assert_array_equal(plane_owner(planes - n, n, size), owners)


@pytest.mark.parametrize("n,size", [(5, 2), (7, 3), (2, 3), (1, 4), (8, 8), (4, 1)])
def test_next_nonempty_rank(n, size):
    nonempty = [r for r in range(size) if slab_bounds(n, size, r)[1] > slab_bounds(n, size, r)[0]]
    for rank in range(size):
        start, stop = slab_bounds(n, size, rank)
        nxt = next_nonempty_rank(n, size, rank)
        nxt_start, nxt_stop = slab_bounds(n, size, nxt)
        assert nxt in nonempty  # never an empty rank, also for an empty rank's query
        assert nxt_start <= stop % n < nxt_stop  # it owns the plane right after this slab
        if stop > start:
            assert nxt_start == stop % n  # and, after a non-empty slab, starts there
            assert (nxt == rank) == (len(nonempty) == 1)
    if size > n:  # some ranks are empty: every one of them sends its ghost to a non-empty rank
        assert len(nonempty) == n


def test_uneven_example():
    # 10 planes over 3 ranks: 4, 3, 3 (mpi4py-fft's distribution)
    assert [slab_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert list(plane_owner([0, 3, 4, 6, 7, 9, 10, -1], 10, 3)) == [0, 0, 1, 1, 2, 2, 0, 2]


@pytest.mark.parametrize("args", [(-1, 2, 0), (4, 0, 0), (4, 2, 2), (4, 2, -1)])
def test_bad_queries_refused(args):
    with pytest.raises(ValueError, match="bad slab query"):
        slab_bounds(*args)


@pytest.mark.parametrize("n,size", [(10, 3), (4, 3), (9, 2), (7, 4)])
def test_plane_transfer_moves_every_plane_once(n, size):
    """Between our slabs and blocks of ceil(n/size) (PFFT's layout): what each rank sends is what
    the receiver expects, and every plane lands where the other layout keeps it."""
    from lagbias_mpi.mpi.layout import plane_transfer

    ours = slab_starts(n, size)
    block = -(-n // size)
    theirs = np.minimum(np.arange(size + 1) * block, n)
    dst = np.full(n, -1)
    for r in range(size):
        send, send_off = plane_transfer(ours[r], ours[r + 1], theirs[:-1], theirs[1:])
        for q in range(size):
            recv, recv_off = plane_transfer(theirs[q], theirs[q + 1], ours[:-1], ours[1:])
            assert send[q] == recv[r]
            planes = np.arange(ours[r], ours[r + 1])[send_off[q]:send_off[q] + send[q]]
            np.testing.assert_array_equal(planes, np.arange(theirs[q], theirs[q + 1])[recv_off[r]:recv_off[r] + recv[r]])
            dst[planes] = q
    np.testing.assert_array_equal(dst, np.searchsorted(theirs, np.arange(n), side="right") - 1)
    with pytest.raises(ValueError, match="bad slabs"):
        plane_transfer(3, 2, [0], [4])
