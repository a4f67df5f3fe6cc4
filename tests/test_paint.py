"""NGP/CIC painting on slabs, routing, readout: gathered results equal the serial references."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.mesh.grid import cell_index, grid_coordinates
from lagbias_mpi.mesh.paint import (
    cic_numpy_reference,
    paint,
    readout_cic,
    readout_index,
    slab_offset,
    route_to_slabs,
)
from lagbias_mpi.mpi.comm import gather_slabs
from lagbias_mpi.mpi.layout import slab_bounds

BOX = 40.0


def my_share(comm, arr):
    """This rank's part of a global array split unevenly (the last rank gets none when size > 1)."""
    k = max(comm.size - 1, 1)
    edges = list(np.linspace(0, len(arr), k + 1).astype(int)) + [len(arr)] * (comm.size - k)
    return arr[edges[comm.rank]:edges[comm.rank + 1]]


def global_particles(n, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    pos = ((rng.random((n, 3)) - 0.5) * BOX).astype(dtype)
    return pos, rng.random(n) + 0.5


def ngp_reference(pos, weight, nmesh):
    idx = cell_index(pos, nmesh, BOX)
    flat = (idx[:, 0] * nmesh + idx[:, 1]) * nmesh + idx[:, 2]
    return np.bincount(flat, weights=weight, minlength=nmesh**3).reshape((nmesh,) * 3)


@pytest.mark.mpi
@pytest.mark.parametrize("nmesh", [2, 7, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cic_equals_reference_and_self(comm, nmesh, dtype):
    pos, w = global_particles(3000, dtype)
    slab = paint(comm, my_share(comm, pos), my_share(comm, w), nmesh, BOX, "cic")
    start, stop = slab_bounds(nmesh, comm.size, comm.rank)
    assert slab.shape == (stop - start, nmesh, nmesh)
    got = gather_slabs(comm, slab)
    ref = cic_numpy_reference(pos, w, nmesh, BOX)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, paint(MPI.COMM_SELF, pos, w, nmesh, BOX, "cic"), rtol=1e-12, atol=1e-12)
    assert got.sum() == pytest.approx(w.sum(), rel=1e-12)


@pytest.mark.mpi
@pytest.mark.parametrize("nmesh", [2, 7, 12])
def test_ngp_equals_reference(comm, nmesh):
    pos, w = global_particles(3000, seed=1)
    got = gather_slabs(comm, paint(comm, my_share(comm, pos), my_share(comm, w), nmesh, BOX, "ngp"))
    np.testing.assert_allclose(got, ngp_reference(pos, w, nmesh), rtol=1e-12, atol=1e-12)


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["ngp", "cic"])
def test_sum_of_weights_conserved_with_common_weight(comm, method):
    pos, _ = global_particles(2001, np.float32, seed=2)
    mine = my_share(comm, pos)
    for weight, total in [(None, 2001.0), (2.5, 2.5 * 2001)]:
        slab = paint(comm, mine, weight, 9, BOX, method, dtype=np.float32)
        assert slab.dtype == np.float32
        assert comm.allreduce(float(slab.sum(dtype=np.float64))) == pytest.approx(total, rel=1e-6)


@pytest.mark.mpi
def test_more_ranks_than_planes(comm):
    """nmesh = 1 or 2 with up to 3 ranks: ranks without planes paint nothing, mass is kept."""
    pos, w = global_particles(500, seed=3)
    for nmesh in (1, 2):
        for method, ref in (("cic", cic_numpy_reference(pos, w, nmesh, BOX)), ("ngp", ngp_reference(pos, w, nmesh))):
            slab = paint(comm, my_share(comm, pos), my_share(comm, w), nmesh, BOX, method)
            start, stop = slab_bounds(nmesh, comm.size, comm.rank)
            assert slab.shape[0] == stop - start
            np.testing.assert_allclose(gather_slabs(comm, slab), ref, rtol=1e-12)


def edge_particles(nmesh):
    cell = BOX / nmesh
    half = np.float32(BOX / 2)
    below = float(np.nextafter(half, np.float32(0)))  # largest float32 below +box/2
    return np.array([
        [-BOX / 2, -BOX / 2, -BOX / 2],  # grid point 0
        [BOX / 2, BOX / 2, BOX / 2],  # +box/2 wraps to grid point 0
        [BOX / 2 - cell, 0.0, 0.0],  # exactly on the last grid point / cell edge
        [below, 0.0, 0.0],  # float32 just below +box/2: last cell, CIC shared with plane 0
    ], dtype=np.float32)


def test_edge_positions_cell_index():
    nmesh = 8
    idx = cell_index(edge_particles(nmesh), nmesh, BOX)
    np.testing.assert_array_equal(idx, [[0, 0, 0], [0, 0, 0], [7, 4, 4], [7, 4, 4]])
    u = grid_coordinates(np.array([[-1e-17 - BOX / 2, 0, 0]]), nmesh, BOX)
    assert 0 <= u[0, 0] < nmesh  # mod rounding to n is mapped back to 0
    np.testing.assert_array_equal(cell_index(np.array([[BOX * 1.5, -BOX, 3 * BOX / 2]]), nmesh, BOX), [[0, 4, 0]])


@pytest.mark.mpi
@pytest.mark.parametrize("method", ["ngp", "cic"])
def test_edge_positions_painted(comm, method):
    nmesh = 8
    pos = edge_particles(nmesh)
    mine = pos if comm.rank == 0 else pos[:0]
    got = gather_slabs(comm, paint(comm, mine, None, nmesh, BOX, method))
    assert got.sum() == pytest.approx(4.0, rel=1e-12)
    assert got[0, 0, 0] == pytest.approx(2.0, abs=1e-5)
    assert got[7, 4, 4] + got[0, 4, 4] == pytest.approx(2.0, rel=1e-12)
    if method == "ngp":
        assert got[7, 4, 4] == 2.0
    else:
        assert got[7, 4, 4] == pytest.approx(1.0, abs=1e-5)  # the last particle sits at u = 8 - 1e-6
        assert got[0, 4, 4] == pytest.approx(1.0, abs=1e-5)
    ref = cic_numpy_reference(pos, np.ones(4), nmesh, BOX) if method == "cic" else ngp_reference(pos, np.ones(4), nmesh)
    np.testing.assert_allclose(got, ref, atol=1e-12)


@pytest.mark.mpi
def test_route_to_slabs(comm):
    nmesh = 10
    pos, w = global_particles(400, seed=4)
    got = route_to_slabs(comm, my_share(comm, pos), {"w": my_share(comm, w)}, nmesh, BOX)
    start, stop = slab_bounds(nmesh, comm.size, comm.rank)
    plane = cell_index(got["pos"], nmesh, BOX)[:, 0]
    assert np.all((plane >= start) & (plane < stop))
    assert comm.allreduce(len(got["w"])) == 400
    assert comm.allreduce(float(got["w"].sum())) == pytest.approx(w.sum(), rel=1e-12)
    routed = paint(comm, got["pos"], got["w"], nmesh, BOX, "cic", routed=True)
    np.testing.assert_allclose(gather_slabs(comm, routed), cic_numpy_reference(pos, w, nmesh, BOX), rtol=1e-12)


@pytest.mark.mpi(min_size=2)
def test_unrouted_particles_refused(comm):
    nmesh = 12
    start, _ = slab_bounds(nmesh, comm.size, comm.rank)
    x = -BOX / 2 + ((start - 1) % nmesh + 0.5) * BOX / nmesh  # the plane before my slab
    with pytest.raises(ValueError, match="route them first"):
        paint(comm, np.array([[x, 0.0, 0.0]]), None, nmesh, BOX, routed=True)


def test_bad_arguments_refused():
    pos = np.zeros((3, 3))
    with pytest.raises(ValueError, match="method"):
        paint(MPI.COMM_SELF, pos, None, 4, BOX, method="tsc")
    with pytest.raises(ValueError, match="weights"):
        paint(MPI.COMM_SELF, pos, np.ones(4), 4, BOX)
    with pytest.raises(ValueError, match="shape"):
        paint(MPI.COMM_SELF, np.zeros((3, 2)), None, 4, BOX)


@pytest.mark.mpi
def test_readout_cic_of_linear_and_constant_fields(comm):
    nmesh = 9
    i = np.arange(nmesh, dtype=np.float64)
    start, stop = slab_bounds(nmesh, comm.size, comm.rank)
    linear = 1 + 2 * i[start:stop, None, None] + 3 * i[None, :, None] + 5 * i[None, None, :]
    rng = np.random.default_rng([5, comm.rank])
    u = rng.random((200, 3)) * (nmesh - 1)  # inside [0, n-1]: the field is linear there
    pos = u * BOX / nmesh - BOX / 2
    got = route_to_slabs(comm, pos, {}, nmesh, BOX)
    u_got = (got["pos"] + BOX / 2) * nmesh / BOX
    np.testing.assert_allclose(readout_cic(comm, linear, got["pos"], BOX), 1 + u_got @ [2, 3, 5], rtol=1e-12)
    # constant field, positions anywhere including the periodic wrap
    anywhere = route_to_slabs(comm, (rng.random((200, 3)) - 0.5) * BOX, {}, nmesh, BOX)["pos"]
    const = np.full((stop - start, nmesh, nmesh), 3.25)
    np.testing.assert_allclose(readout_cic(comm, const, anywhere, BOX), 3.25, rtol=1e-14)


@pytest.mark.mpi
def test_readout_cic_equals_self(comm):
    nmesh = 8
    full = np.random.default_rng(6).standard_normal((nmesh,) * 3)
    start, stop = slab_bounds(nmesh, comm.size, comm.rank)
    pos, _ = global_particles(300, seed=7)
    got = route_to_slabs(comm, my_share(comm, pos), {"uid": my_share(comm, np.arange(300))}, nmesh, BOX)
    vals = readout_cic(comm, full[start:stop], got["pos"], BOX)
    ref = readout_cic(MPI.COMM_SELF, full, pos, BOX)
    np.testing.assert_allclose(vals, ref[got["uid"]], rtol=1e-12)


@pytest.mark.mpi
def test_readout_index(comm):
    nmesh = 7
    full = np.random.default_rng(8).standard_normal((nmesh,) * 3)
    start, stop = slab_bounds(nmesh, comm.size, comm.rank)
    rng = np.random.default_rng([9, comm.rank])
    idx = np.stack([rng.integers(start, max(stop, start + 1), 50), rng.integers(0, nmesh, 50),
                    rng.integers(0, nmesh, 50)], axis=1)[: 50 if stop > start else 0]
    np.testing.assert_array_equal(readout_index(full[start:stop], start, idx), full[tuple(idx.T)])
    off = slab_offset(idx, start, full[start:stop].shape)
    np.testing.assert_array_equal(full[start:stop].reshape(-1)[off], full[tuple(idx.T)])
    if stop > start:
        with pytest.raises(ValueError, match="outside"):
            slab_offset(np.array([[start - 1, 0, 0]]), start, full[start:stop].shape)
        with pytest.raises(ValueError, match="outside"):
            readout_index(full[start:stop], start, np.array([[stop % nmesh + nmesh * (stop == nmesh), 0, 0]]))
