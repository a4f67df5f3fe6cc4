"""Sub-sampling and batches are pure functions of global ids and the seed."""
import numpy as np
import pytest

from lagbias_mpi.training import sampling


def _particles(n=5000, n_cells=300, seed=0):
    rng = np.random.default_rng(seed)
    pid = rng.permutation(10 * n)[:n].astype(np.uint64)
    cell = rng.integers(0, n_cells, n)
    return pid, cell


def test_select_counts_and_partition_independence():
    pid, cell = _particles()
    sel, cells, n, n_sel = sampling.select_in_cells(cell, pid, 0.1, seed=5, member=0)
    assert np.array_equal(n, np.bincount(cell)[cells])
    assert np.array_equal(n_sel, np.maximum((0.1 * n).astype(int), 1))
    assert np.array_equal(np.bincount(cell[sel], minlength=cells.max() + 1)[cells], n_sel)
    chosen = set(pid[sel].tolist())
    # any split of the cells over "ranks" and any particle order selects the same particles
    rng = np.random.default_rng(1)
    owner = rng.integers(0, 3, cell.max() + 1)
    again = set()
    for r in range(3):
        mine = np.nonzero(owner[cell] == r)[0]
        mine = mine[rng.permutation(len(mine))]
        s, *_ = sampling.select_in_cells(cell[mine], pid[mine], 0.1, seed=5, member=0)
        again |= set(pid[mine][s].tolist())
    assert again == chosen
    # another member or seed selects differently
    other, *_ = sampling.select_in_cells(cell, pid, 0.1, seed=5, member=1)
    assert set(pid[other].tolist()) != chosen


def test_batches_deterministic_and_balanced():
    cells = np.arange(20000)
    b = sampling.batch_of_cells(cells, seed=3, member=2, n_batches=8)
    assert b.min() == 0 and b.max() == 7
    counts = np.bincount(b)
    assert np.all(np.abs(counts - 2500) < 5 * np.sqrt(2500))
    assert np.array_equal(b[::-1], sampling.batch_of_cells(cells[::-1], seed=3, member=2, n_batches=8))
    assert not np.array_equal(b, sampling.batch_of_cells(cells, seed=4, member=2, n_batches=8))
    o1 = sampling.batch_order(8, 3, 0, 1)
    assert sorted(o1) == list(range(8))
    assert np.array_equal(o1, sampling.batch_order(8, 3, 0, 1))
    assert not np.array_equal(o1, sampling.batch_order(8, 3, 0, 2))
    assert sampling.n_batches_for(250_000, 100_000) == 2
    assert sampling.n_batches_for(10, 100_000) == 1


def test_hash_uniform_range():
    u = sampling.hash_uniform(np.arange(100000), 1, 0, 7)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert sampling.n_selected(np.array([0, 1, 9, 10, 25]), 0.1).tolist() == [0, 1, 1, 1, 2]


@pytest.mark.mpi
def test_selection_same_on_any_rank_count(comm):
    """Particles spread over the ranks by cell plane select the same set as on one rank."""
    pid, cell = _particles(n=4000, n_cells=512, seed=2)
    plane = cell // 64  # 8 "planes" of 64 cells
    mine = np.nonzero(plane % comm.size == comm.rank)[0]
    sel, *_ = sampling.select_in_cells(cell[mine], pid[mine], 0.25, seed=9, member=1)
    got = sorted(sum(comm.allgather(pid[mine][sel].tolist()), []))
    ref, *_ = sampling.select_in_cells(cell, pid, 0.25, seed=9, member=1)
    assert got == sorted(pid[ref].tolist())


def test_resolve_frac_auto():
    """auto: per_cell / occupancy, clipped to [10%, 1]; a number is taken as it is."""
    assert sampling.resolve_frac(0.25, 50, 1000, 10) == 0.25
    assert np.isclose(sampling.resolve_frac("auto", 10, 128**3, 40**3), 10 / (128**3 / 40**3))
    assert sampling.resolve_frac("auto", 50, 500 * 1000, 1000) == pytest.approx(0.1)  # AbacusSummit-like cells
    assert sampling.resolve_frac("auto", 50, 5000 * 1000, 1000) == pytest.approx(0.1)  # never below the paper's 10%
    assert sampling.resolve_frac("auto", 50, 20 * 1000, 1000) == 1.0


def test_cell_scale_and_weight():
    """The per-cell scale is N_cells/N_part n/n_sel and the weight n/n_sel, 0 without selected particles."""
    n, n_sel = np.array([10, 3, 0]), np.array([2, 3, 0])
    assert np.allclose(sampling.cell_weight(n, n_sel), [5.0, 1.0, 0.0])
    assert np.allclose(sampling.cell_scale(n, n_sel, 8, 16), [2.5, 0.5, 0.0])


def _sorted_layout(seed=3, n=4000, n_cells=300):
    rng = np.random.default_rng(seed)
    cell = rng.integers(0, n_cells, n).astype(np.int32)
    pid = rng.permutation(10 * n)[:n].astype(np.uint64)
    order = np.lexsort((pid, cell))
    return cell[order], pid[order]


@pytest.mark.parametrize("chunk", [1, 37, 1000, 1 << 18])
def test_select_in_chunks_of_whole_cells_equals_one_sort(chunk):
    """Rows grouped by cell (the Eulerian layout) are selected a chunk of whole cells at a time with
    the result of the one global sort, for chunks smaller than a cell too."""
    cell, pid = _sorted_layout()
    assert sampling.sorted_by_cell_and_id(cell, pid, chunk=max(chunk, 2))
    ref = sampling._select(cell, pid, 0.3, 5, 1)
    got = sampling.select_in_cells(cell, pid, 0.3, 5, 1, chunk=chunk)
    for a, b in zip(got, ref):
        assert np.array_equal(a, b)
    shuffled = np.random.default_rng(0).permutation(len(cell))
    assert not sampling.sorted_by_cell_and_id(cell[shuffled], pid[shuffled])


def test_batches_of_grouped_rows_equal_general_path():
    """The counting sort of the grouped layout gives every batch the particles (in order: cell, pid)
    and cells of the general path on a shuffled copy of the same particles."""
    from mpi4py import MPI

    from lagbias_mpi.training.batches import build_batches

    cell, pid = _sorted_layout(n=5000)
    theta = np.random.default_rng(1).standard_normal((len(cell), 3)).astype(np.float32)
    perm = np.random.default_rng(2).permutation(len(cell))

    def target(cells):
        return np.sin(np.asarray(cells, np.float64))

    args = (target, 300, len(cell), 0.5, 400, 11, 0)
    a = build_batches(MPI.COMM_SELF, theta, cell, pid, *args)
    b = build_batches(MPI.COMM_SELF, theta[perm], cell[perm], pid[perm], *args)
    assert len(a) == len(b) > 3
    for x, y in zip(a.batches, b.batches):
        assert np.array_equal(pid[x.pidx], pid[perm][y.pidx])
        assert np.array_equal(x.x.numpy(), y.x.numpy()) and np.array_equal(x.idx.numpy(), y.idx.numpy())
        assert x.stored_idx is None and y.stored_idx is not None  # grouped: the cell index found per step
        assert np.array_equal(x.target.numpy(), y.target.numpy()) and x.n_all == y.n_all
