"""Cell ownership balanced by particle count: pure partition functions and the redistribution of
grid values between plane slabs and cell owners."""
import numpy as np
import pytest

from lagbias_mpi.mpi.cells import CellOwnership, balanced_edges, range_overlaps
from lagbias_mpi.mpi.exchange import redistribute_ranges


def _per_rank(counts, edges):
    cum = np.concatenate([[0], np.cumsum(counts)])
    return cum[edges[1:]] - cum[edges[:-1]]


def _check_edges(edges, n, size):
    assert len(edges) == size + 1 and edges[0] == 0 and edges[-1] == n
    assert np.all(np.diff(edges) >= 0)
    if size <= n:
        assert np.all(np.diff(edges) >= 1)  # every rank owns a cell


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_uniform_counts_balanced(size):
    rng = np.random.default_rng(size)
    counts = rng.poisson(40, 40**3)
    edges = balanced_edges(counts, size)
    _check_edges(edges, len(counts), size)
    per = _per_rank(counts, edges)
    assert per.sum() == counts.sum()
    assert per.max() / per.mean() <= 1.10


@pytest.mark.parametrize("size", [2, 3, 16, 200, 5000])
def test_clustered_counts_balanced(size):
    """Log-normal counts (a clustered box: many nearly empty cells, a few very full), concentrated in
    a quarter of the planes: plane ownership is far off, cell ownership is balanced to within one
    cell's count at each cut, i.e. max/mean <= 1.10 wherever one cell holds <= 5% of N / P."""
    rng = np.random.default_rng(1)
    n = 32
    counts = rng.poisson(20 * np.exp(rng.normal(0, 1.0, n**3)))
    counts.reshape(n, n, n)[: n // 4] *= 5
    edges = balanced_edges(counts, size)
    _check_edges(edges, len(counts), size)
    per = _per_rank(counts, edges)
    mean = counts.sum() / size
    assert per.sum() == counts.sum()
    assert per.max() <= mean + counts.max()
    if counts.max() <= 0.05 * mean:
        assert per.max() / mean <= 1.10
    ideal = counts.sum() * np.arange(size + 1) / size
    cum = np.concatenate([[0], np.cumsum(counts)])
    assert np.all(np.abs(cum[edges] - ideal) <= counts.max())  # every cut within a cell of the ideal one
    if size <= n:
        per_plane = _per_rank(counts, CellOwnership.by_planes(n, size).edges)
        assert per_plane.max() / per_plane.mean() > 1.5  # what plane ownership gave


def test_more_ranks_than_planes_and_one_cell_per_rank():
    n = 4
    counts = np.ones(n**3, np.int64)
    edges = balanced_edges(counts, 2 * n)  # more ranks than planes
    _check_edges(edges, n**3, 2 * n)
    assert np.all(np.diff(edges) == n**3 // (2 * n))
    edges = balanced_edges(counts, n**3)  # one cell per rank
    assert np.array_equal(edges, np.arange(n**3 + 1))
    # one cell per rank even when all particles sit in one cell
    counts = np.zeros(n**3, np.int64)
    counts[5] = 1000
    edges = balanced_edges(counts, n**3)
    assert np.array_equal(edges, np.arange(n**3 + 1))
    edges = balanced_edges(counts, 3)
    _check_edges(edges, n**3, 3)
    assert _per_rank(counts, edges).max() == 1000


def test_empty_ranks_and_no_particles():
    counts = np.array([3, 0, 5], np.int64)
    edges = balanced_edges(counts, 5)  # more ranks than cells: two ranks own nothing
    _check_edges(edges, 3, 5)
    assert np.sum(np.diff(edges) == 0) == 2
    own = CellOwnership(3, edges)
    assert np.array_equal(own.owner([0, 1, 2]), [np.searchsorted(edges, c, "right") - 1 for c in range(3)])
    assert all(own.bounds(r)[0] <= c < own.bounds(r)[1] for c, r in zip(range(3), own.owner([0, 1, 2])))
    # no particles at all: cells split evenly
    assert np.array_equal(balanced_edges(np.zeros(10, np.int64), 3), [0, 4, 7, 10])
    assert np.array_equal(balanced_edges(np.zeros(0, np.int64), 2), [0, 0, 0])
    with pytest.raises(ValueError):
        balanced_edges(np.array([1, -1]), 2)
    with pytest.raises(ValueError):
        own.owner([3])


def test_owner_and_local_values():
    own = CellOwnership(10, np.array([0, 3, 3, 10]))
    assert list(own.owner(np.arange(10))) == [0, 0, 0, 2, 2, 2, 2, 2, 2, 2]
    assert list(own.counts()) == [3, 0, 7]
    vals = np.arange(3, 10) * 10.0
    assert list(own.local_values(vals, 2, [9, 3])) == [90.0, 30.0]
    with pytest.raises(ValueError):
        own.local_values(vals, 2, [2])


def test_range_overlaps_cover_every_element_once():
    src, dst = np.array([0, 5, 5, 12]), np.array([0, 2, 9, 12])
    got = np.zeros(12, int)
    for r in range(3):
        sc, sd, rc, rd = range_overlaps(src, dst, r)
        assert sc.sum() == src[r + 1] - src[r] and rc.sum() == dst[r + 1] - dst[r]
        for q in range(3):
            got[src[r] + sd[q]: src[r] + sd[q] + sc[q]] += 1
            # what q receives from r is what r sends to q
            assert range_overlaps(src, dst, q)[2][r] == sc[q]
    assert np.all(got == 1)


@pytest.mark.mpi
def test_redistribute_between_planes_and_owners(comm):
    """A grid whose values are their flat ids goes from plane slabs to balanced owners and back."""
    n = 5
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, n**3)
    own = CellOwnership.balanced(counts, comm.size)
    planes = CellOwnership.by_planes(n, comm.size)
    lo, hi = planes.bounds(comm.rank)
    values = np.arange(lo, hi, dtype=np.float64)
    owned = redistribute_ranges(comm, values, planes.edges, own.edges)
    assert np.array_equal(owned, np.arange(*own.bounds(comm.rank), dtype=np.float64))
    back = redistribute_ranges(comm, owned, own.edges, planes.edges)
    assert np.array_equal(back, values)
