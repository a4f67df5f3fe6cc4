"""Two-stage routing: particles conserved, features read at the right IC grid point, cells local."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.bias.routing import route_eulerian, route_lagrangian
from lagbias_mpi.mesh.paint import readout_index
from lagbias_mpi.mesh.grid import cell_index, ic_index, lattice_index, particle_id
from lagbias_mpi.mpi.layout import slab_bounds


def _check_cells_on_one_rank(comm, cell, own):
    """Every particle is on the owner of its cell, so every cell with all its particles is on one rank."""
    lo, hi = own.bounds(comm.rank)
    assert np.all((cell >= lo) & (cell < hi))
    assert np.array_equal(np.concatenate(comm.allgather(own.edges)), np.tile(own.edges, comm.size))
    assert own.edges[0] == 0 and own.edges[-1] == own.n_cells and np.all(np.diff(own.edges) >= 0)


def test_ic_index_rounding():
    lagr = np.array([[0, 1, 2], [3, 4, 7]])
    assert ic_index(lagr, 8, 16).tolist() == [[0, 2, 4], [6, 8, 14]]
    # ppd > n_ic: nearest grid point, periodic
    assert ic_index(np.array([[7, 1, 2]]), 8, 4).tolist() == [[0, 1, 1]]
    assert particle_id(np.array([[1, 2, 3]]), 10).tolist() == [123]


def test_lattice_index_inverts_particle_id():
    rng = np.random.default_rng(3)
    for ppd in (1, 7, 6912):  # 6912: the AbacusSummit base box, ids beyond 2^32
        lagr = rng.integers(0, ppd, (500, 3))
        np.testing.assert_array_equal(lattice_index(particle_id(lagr, ppd), ppd), lagr)
    assert lattice_index(np.array([123], np.uint64), 10).tolist() == [[1, 2, 3]]


@pytest.mark.mpi
def test_routing_conserves_and_reads_right_values(comm):
    ppd, n_ic, box, n_grid = 8, 12, 48.0, 5
    rng = np.random.default_rng(comm.rank)
    n_local = [50, 0, 70][comm.rank % 3]  # include a rank with no particles
    lagr = rng.integers(0, ppd, (n_local, 3)).astype(np.int32)
    pos = rng.uniform(-box / 2, box / 2, (n_local, 3)).astype(np.float32)
    # a feature slab whose value encodes the global grid index
    s0, s1 = slab_bounds(n_ic, comm.size, comm.rank)
    ii = np.arange(s0, s1)[:, None, None] * n_ic**2 + np.arange(n_ic)[None, :, None] * n_ic + np.arange(n_ic)
    slab = np.stack([ii, -ii], axis=-1).astype(np.float64)
    stats = []
    got = route_lagrangian(comm, {"lagr_index": lagr, "pos": pos}, ppd, n_ic, stats=stats)
    assert comm.allreduce(len(got["pos"])) == comm.allreduce(n_local)
    assert stats[0][1].n_global == comm.allreduce(n_local)
    vals = readout_index(slab, s0, got["ic_index"])
    idx = ic_index(got["lagr_index"], ppd, n_ic)
    assert np.array_equal(vals[:, 0], (idx[:, 0] * n_ic + idx[:, 1]) * n_ic + idx[:, 2])
    assert np.array_equal(vals[:, 1], -vals[:, 0])
    eul, own = route_eulerian(comm, {"pos": got["pos"], "val": vals}, n_grid, box)
    assert comm.allreduce(len(eul["pos"])) == comm.allreduce(n_local)
    ci = cell_index(eul["pos"], n_grid, box)
    assert np.array_equal(eul["cell"], (ci[:, 0] * n_grid + ci[:, 1]) * n_grid + ci[:, 2])
    _check_cells_on_one_rank(comm, eul["cell"], own)
    # the multiset of (value) pairs travelled intact
    allv = sorted(sum(comm.allgather(eul["val"][:, 0].tolist()), []))
    ref = sorted(sum(comm.allgather(vals[:, 0].tolist()), []))
    assert allv == ref


@pytest.mark.mpi
@pytest.mark.parametrize("n_grid", [1, 2, 16])
def test_eulerian_routing_balances_clustered_particles(comm, n_grid):
    """Clustered particles (most in one corner of the box) end on the owners of their cells,
    balanced by count; with 1 or 8 cells some ranks own no cell (or hold no particle) at 2/3 ranks."""
    box = 100.0
    rng = np.random.default_rng(10 + comm.rank)
    n_local = [3000, 0, 5000][comm.rank % 3]
    clump = rng.random(n_local) < 0.7
    pos = np.where(clump[:, None], rng.normal(-30, 6, (n_local, 3)), rng.uniform(-50, 50, (n_local, 3)))
    pos = (np.mod(pos + box / 2, box) - box / 2).astype(np.float32)
    pid = np.arange(n_local, dtype=np.uint64) + np.uint64(10**6 * comm.rank)
    eul, own = route_eulerian(comm, {"pos": pos, "pid": pid}, n_grid, box)
    assert comm.allreduce(len(pid)) == comm.allreduce(len(eul["pid"]))
    assert sorted(sum(comm.allgather(eul["pid"].tolist()), [])) == sorted(sum(comm.allgather(pid.tolist()), []))
    _check_cells_on_one_rank(comm, eul["cell"], own)
    ci = cell_index(eul["pos"], n_grid, box)
    assert np.array_equal(eul["cell"], (ci[:, 0] * n_grid + ci[:, 1]) * n_grid + ci[:, 2])
    n_ranks = comm.allgather(len(eul["pid"]))
    if n_grid**3 < comm.size:
        assert 0 in own.counts()
    if n_grid == 16:
        assert np.all(own.counts() >= 1)
        assert max(n_ranks) / np.mean(n_ranks) <= 1.10


@pytest.mark.mpi
def test_eulerian_layout_sorted_by_cell_and_id_same_on_any_rank_count(comm):
    """After the Eulerian routing the rows are grouped by cell in increasing cell id and ordered by
    pid inside each cell (small exchange rounds interleave the sources), and the gathered layout
    equals the one-rank layout row for row."""
    from lagbias_mpi.mpi import exchange as exchange_module

    box, n_grid = 100.0, 6
    rng = np.random.default_rng(20 + comm.rank)
    n_local = [700, 0, 1100][comm.rank % 3]
    pos = rng.uniform(-50, 50, (n_local, 3)).astype(np.float32)
    pid = rng.permutation(n_local).astype(np.uint64) + np.uint64(10**6 * comm.rank)
    val = rng.standard_normal((n_local, 2)).astype(np.float32)
    full = {k: np.concatenate(comm.allgather(v)) for k, v in (("pos", pos), ("pid", pid), ("val", val))}
    old = exchange_module.EXCHANGE_CHUNK_BYTES
    try:
        exchange_module.EXCHANGE_CHUNK_BYTES = 200  # ~9 rows per round
        eul, own = route_eulerian(comm, {"pos": pos.copy(), "pid": pid.copy(), "val": val.copy()}, n_grid, box)
    finally:
        exchange_module.EXCHANGE_CHUNK_BYTES = old
    one, _ = route_eulerian(MPI.COMM_SELF, {k: v.copy() for k, v in full.items()}, n_grid, box)
    key = np.lexsort((eul["pid"], eul["cell"]))
    assert np.array_equal(key, np.arange(len(key)))  # sorted by (cell, pid)
    for name in ("pos", "pid", "val", "cell"):
        assert np.array_equal(np.concatenate(comm.allgather(eul[name])), one[name])


@pytest.mark.mpi
@pytest.mark.parametrize("n_grid", [1, 3, 10])
def test_distributed_ownership_equals_global_histogram(comm, n_grid):
    """The ownership from the slab counts (no rank holds the whole histogram) has the edges of
    balanced_edges on the global histogram, and every rank gets the counts of its cells; clustered
    particles, a rank without particles, more ranks than planes (n_grid 1)."""
    from lagbias_mpi.bias.routing import _ownership_and_counts, flat_cells
    from lagbias_mpi.mpi.cells import balanced_edges

    box = 100.0
    rng = np.random.default_rng(30 + comm.rank)
    n_local = [2500, 0, 4000][comm.rank % 3]
    pos = np.where((rng.random(n_local) < 0.8)[:, None], rng.normal(20, 4, (n_local, 3)),
                   rng.uniform(-50, 50, (n_local, 3)))
    pos = (np.mod(pos + box / 2, box) - box / 2).astype(np.float32)
    own, counts = _ownership_and_counts(comm, pos, n_grid, box)
    all_cells = np.concatenate(comm.allgather(flat_cells(pos, n_grid, box)))
    hist = np.bincount(all_cells, minlength=n_grid**3)
    assert np.array_equal(own.edges, balanced_edges(hist, comm.size))
    lo, hi = own.bounds(comm.rank)
    assert np.array_equal(counts, hist[lo:hi])
