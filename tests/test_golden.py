"""Golden values pinned before the layout refactor merged duplicated numerics, so that cached
simulations (keyed by config hash, not by code) stay valid: the one splitmix64, the one periodic wrap,
the IC grid point of a lattice index and the planted truth reproduce what the earlier copies gave."""
import numpy as np
from mpi4py import MPI

from lagbias_mpi.config.simulate import PlantedConfig
from lagbias_mpi.core.hashing import splitmix64
from lagbias_mpi.mesh.grid import ic_index, wrap_centred, wrap_positions, wrap_unit
from lagbias_mpi.mpi.fft import SlabFFT
from lagbias_mpi.nbody.planted import planted_weights


def test_splitmix64_reference_values():
    # the reference splitmix64 sequence from state 0 (Vigna): 0xe220a8397b1dcdaf, ...
    got = splitmix64(np.arange(3, dtype=np.uint64))
    assert [int(v) for v in got] == [0xE220A8397B1DCDAF, 0x910A2DEC89025CC1, 0x975835DE1C9756CE]
    assert splitmix64(np.uint64(5)).shape == (1,)


def _old_pm_wrap(pos, box):
    out = np.mod(pos + 0.5 * box, box) - 0.5 * box
    out[out >= 0.5 * box] = -0.5 * box
    return out


def _old_abacus_wrap(pos, box):
    half = np.float32(0.5 * box)
    out = np.empty(np.shape(pos), dtype=np.float32)
    out[...] = pos
    bad = (out >= half) | (out < -half)
    if bad.any():
        x = np.mod(np.asarray(pos, dtype=np.float64)[bad] + 0.5 * box, box) - 0.5 * box
        x = x.astype(np.float32)
        x[x >= half] -= np.float32(box)
        out[bad] = np.maximum(x, -half)
    return out


def test_one_wrap_reproduces_the_old_copies_bitwise():
    box = 32.0
    rng = np.random.default_rng(3)
    pos = np.concatenate([rng.uniform(-2 * box, 2 * box, 3000), [0.5 * box, -0.5 * box, box, -box,
                          np.nextafter(0.5 * box, 0), np.nextafter(-0.5 * box, -box), 1.5 * box]])
    np.testing.assert_array_equal(wrap_centred(pos, box), _old_pm_wrap(pos, box))
    np.testing.assert_array_equal(wrap_positions(pos, box), _old_abacus_wrap(pos, box))
    w32 = wrap_positions(pos, box)
    assert w32.dtype == np.float32 and w32.min() >= -0.5 * box and w32.max() < 0.5 * box
    u = wrap_unit(pos, box)
    assert u.min() >= 0 and u.max() < box
    np.testing.assert_array_equal(u, np.where(np.mod(pos + 0.5 * box, box) >= box, 0.0, np.mod(pos + 0.5 * box, box)))


def test_ic_index_equals_rint_for_the_shipped_grid_ratios():
    for ppd, n_ic in [(64, 128), (128, 256), (32, 32), (64, 192)]:
        lagr = np.arange(ppd)[:, None].repeat(3, axis=1)
        old = np.rint(lagr.astype(np.float64) * n_ic / ppd).astype(np.int64) % n_ic
        np.testing.assert_array_equal(ic_index(lagr, ppd, n_ic), old)
    # where they differ (a half-way point), ic_index rounds half up, as DESIGN.md says
    assert ic_index(np.array([[1, 1, 1]]), 2, 3)[0, 0] == 2


def test_planted_weights_golden():
    """Values of the planted truth computed with the code before the merge (float32 IC field)."""
    n, ppd, box = 16, 8, 50.0
    fft = SlabFFT(MPI.COMM_SELF, n, box, np.float32)
    ic = np.random.default_rng(7).standard_normal((n, n, n)).astype(np.float32)
    lagr = np.stack(np.meshgrid(*[np.arange(ppd)] * 3, indexing="ij"), -1).reshape(-1, 3)[::37]
    w = planted_weights(MPI.COMM_SELF, fft, ic, lagr, ppd, PlantedConfig(b1=1.0, b2=0.1, c_lap=-0.3, radius=4.0))
    golden = [3.2603443427761243, 0.6059872393493073, 0.6171934834034968, 0.6957883954859028,
              0.2318117033154549, 0.7811656735612225]
    # the files store f_true in float32: agreement to float32 precision keeps cached files valid
    np.testing.assert_allclose(w[:6], golden, rtol=1e-7)
    np.testing.assert_allclose(w.sum(), 38.62602121801647, rtol=1e-7)
