"""Features: distributed == serial numpy, standardisation, scale checks."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.bias.features import (
    check_scales,
    compute_features,
    feature_names,
)
from lagbias_mpi.config.features import resolve_scales
from lagbias_mpi.mpi.comm import gather_slabs, global_moments
from lagbias_mpi.mpi.layout import slab_bounds

N, BOX = 16, 64.0


def _field():
    return np.random.default_rng(3).standard_normal((N, N, N)).astype(np.float32)


def _numpy_features(delta, box, radii, kinds):
    """Reference on the full complex grid: mean removed; in the mixed tidal kernels (i != j) each
    factor k_i is 0 on its Nyquist plane (the odd derivative of a real field there), so every kernel
    is Hermitian and its real-space field real."""
    n = delta.shape[0]
    kf = 2 * np.pi / box
    f1 = np.fft.fftfreq(n, 1.0 / n) * kf
    k = [f1[:, None, None], f1[None, :, None], f1[None, None, :]]
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    odd = [np.where(np.isclose(np.abs(ki), n // 2 * kf), 0.0, ki) for ki in k]
    safe = np.where(k2 > 0, k2, 1.0)
    dk = np.fft.fftn(delta.astype(np.float64))
    dk[0, 0, 0] = 0.0

    def real(x):
        out = np.fft.ifftn(x)
        assert np.abs(out.imag).max() < 1e-12 * max(np.abs(out.real).max(), 1e-300)
        return out.real

    cols = []
    for r in radii:
        w = dk * np.exp(-0.5 * k2 * r * r)
        d = real(w)
        for kind in kinds:
            if kind == "delta":
                cols.append(d)
            elif kind == "lap":
                cols.append(real(-k2 * w))
            else:
                tot = 0.0
                for i in range(3):
                    for j in range(3):
                        kern = np.where(k2 > 0, (k[i] * k[j] if i == j else odd[i] * odd[j]) / safe, 0.0)
                        if kind == "s2" and i == j:
                            kern = kern - 1.0 / 3.0
                        tot = tot + real(kern * w) ** 2
                cols.append(tot - d**2 if kind == "g2" else tot)
    return np.stack(cols, axis=-1)


@pytest.mark.mpi
def test_features_match_numpy_and_comm_self(comm):
    delta = _field()
    radii, kinds = (4.0, 8.0), ("delta", "lap", "g2", "s2")
    s0, s1 = slab_bounds(N, comm.size, comm.rank)
    dist = compute_features(comm, delta[s0:s1], BOX, radii, kinds, out_dtype=np.float64)
    full = gather_slabs(comm, dist)
    ref = _numpy_features(delta, BOX, radii, kinds)
    scale = np.abs(ref).max(axis=(0, 1, 2))
    assert np.allclose(full / scale, ref / scale, atol=1e-10)
    single = compute_features(MPI.COMM_SELF, delta, BOX, radii, kinds, out_dtype=np.float64)
    assert np.allclose(full, single, rtol=0, atol=1e-12 * scale.max())
    # standardisation with global moments: mean 0, std 1 over the whole grid, on any rank count
    mean, std = global_moments(comm, dist)
    std_full = gather_slabs(comm, (dist - mean) / std)
    assert np.allclose(std_full.mean(axis=(0, 1, 2)), 0, atol=1e-10)
    assert np.allclose(std_full.std(axis=(0, 1, 2)), 1, atol=1e-10)


def test_g2_of_plane_wave_vanishes():
    """For a single plane wave the tidal tensor is rank one: G2 = sum T_ij^2 - delta^2 = 0."""
    x = np.arange(N) * BOX / N
    delta = np.broadcast_to(np.cos(2 * np.pi * 2 * x / BOX)[:, None, None], (N, N, N)).astype(np.float32)
    out = compute_features(MPI.COMM_SELF, delta, BOX, (4.0,), ("delta", "g2"), out_dtype=np.float64)
    assert np.abs(out[..., 0]).max() > 0.1
    assert np.abs(out[..., 1]).max() < 1e-10


@pytest.mark.mpi
def test_features_ignore_the_mean_of_the_field(comm):
    """A constant added to the IC field changes no feature (its k = 0 mode is dropped first)."""
    start, stop = slab_bounds(N, comm.size, comm.rank)
    delta = _field()[start:stop]
    kinds = ("delta", "lap", "g2", "s2")
    a = compute_features(comm, delta, BOX, (3.0,), kinds, out_dtype=np.float64)
    b = compute_features(comm, delta + np.float32(0.3), BOX, (3.0,), kinds, out_dtype=np.float64)
    assert np.allclose(a, b, atol=1e-5 * np.abs(a).max())


def test_tidal_kernel_hermitian():
    """k_i k_j / k^2 on the half-complex grid equals its mirror K(-k) on the self-mirrored planes
    (kz = 0 and kz = Nyquist), the Nyquist planes of kx and ky included."""
    from lagbias_mpi.mpi.fft import SlabFFT, tidal_kernel

    fft = SlabFFT(MPI.COMM_SELF, N, BOX, np.float64)
    mirror = (-np.arange(N)) % N
    for i in range(3):
        for j in range(3):
            kern = tidal_kernel(fft, i, j)
            for z in (0, N // 2):
                plane = kern[:, :, z]
                assert np.allclose(plane, plane[mirror][:, mirror]), (i, j, z)


def test_scale_sets_and_checks():
    assert resolve_scales("3Rf coarse") == (1.0, 2.83, 8.0)
    assert resolve_scales([2, 4]) == (2.0, 4.0)
    with pytest.raises(ValueError, match="unknown smoothing-scale set"):
        resolve_scales("7Rf")
    with pytest.raises(ValueError, match="below the IC grid spacing"):
        check_scales((1.0, 8.0), box=64.0, n_ic=16)
    check_scales((4.0,), box=64.0, n_ic=16)
    assert feature_names((1.0, 2.83), ("delta", "g2")) == ["delta_R1.00", "g2_R1.00", "delta_R2.83", "g2_R2.83"]
    with pytest.raises(ValueError, match="unknown feature"):
        compute_features(MPI.COMM_SELF, _field(), BOX, (4.0,), ("tidal",))


@pytest.mark.mpi
@pytest.mark.parametrize("given_moments", [False, True])
def test_featurised_particles_read_each_column_at_the_ic_point(comm, given_moments):
    """Particles routed first, each feature column read out at their nearest IC grid point and
    standardised: equals the standardised full feature array of the one-rank computation at that
    point, on any rank count (ranks without particles included); the box's own moments are the
    global moments of its IC grid."""
    from lagbias_mpi.bias.particles import featurised_particles
    from lagbias_mpi.io.simfile import LocalSimulation, SimulationMeta
    from lagbias_mpi.mesh.grid import ic_index, particle_id

    ppd, radii, kinds = 8, (4.0, 8.0), ("delta", "lap", "g2")
    delta = _field()
    s0, s1 = slab_bounds(N, comm.size, comm.rank)
    rng = np.random.default_rng(7 + comm.rank)
    n_local = [40, 0, 25][comm.rank % 3]
    lagr = rng.integers(0, ppd, (n_local, 3)).astype(np.int32)
    pos = rng.uniform(-BOX / 2, BOX / 2, (n_local, 3)).astype(np.float32)
    meta = SimulationMeta(box=BOX, ppd=ppd, n_ic=N, redshift=0.0, z_ic=99.0, particle_mass=1.0,
                          n_particles=comm.allreduce(n_local), n_halos=0)
    sim = LocalSimulation(meta, delta[s0:s1].copy(), s0, lagr, pos, np.zeros((0, 3), np.float32),
                          np.zeros(0, np.int64))
    full = compute_features(MPI.COMM_SELF, delta, BOX, radii, kinds, out_dtype=np.float64)
    own_ref = global_moments(MPI.COMM_SELF, full)
    moments = (own_ref[0] + 0.1, own_ref[1] * 2.0) if given_moments else None
    parts, used, own = featurised_particles(comm, sim, radii, kinds, moments, release_loaded=True)
    assert sim.ic_delta is None and sim.pos is None
    assert np.allclose(own[0], own_ref[0], rtol=0, atol=1e-12 * own_ref[1].max())
    assert np.allclose(own[1], own_ref[1], rtol=1e-12)
    mean, std = moments if given_moments else own_ref
    assert np.allclose(used[0], mean, rtol=1e-12, atol=1e-14) and np.allclose(used[1], std, rtol=1e-12)
    assert comm.allreduce(parts.n_local) == meta.n_particles
    # every particle's row: look it up by its id in the one-rank reference
    lag = np.stack(np.unravel_index(parts.pid.astype(np.int64), (ppd,) * 3), axis=-1)
    idx = ic_index(lag, ppd, N)
    ref = (full[idx[:, 0], idx[:, 1], idx[:, 2]] - mean) / std
    assert parts.raw.dtype == np.float32
    assert np.allclose(parts.raw, ref, rtol=1e-6, atol=1e-6)
    assert np.all((idx[:, 0] >= s0) & (idx[:, 0] < s1))  # on the owner of its IC plane
    ids = np.sort(np.concatenate(comm.allgather(parts.pid)))
    sent = np.sort(np.concatenate(comm.allgather(particle_id(lagr, ppd))))
    assert np.array_equal(ids, sent)


@pytest.mark.mpi
def test_float32_feature_ffts_agree_with_float64(comm):
    """``features.fft_precision: float32`` (about half the FFT memory) gives the float64 features
    to ~1e-6 of each column's std, on any rank count."""
    s0, s1 = slab_bounds(N, comm.size, comm.rank)
    delta = _field()[s0:s1]
    radii, kinds = (2.0, 6.0), ("delta", "lap", "g2", "s2")
    a = compute_features(comm, delta, BOX, radii, kinds, dtype=np.float64, out_dtype=np.float64)
    b = compute_features(comm, delta, BOX, radii, kinds, dtype=np.float32, out_dtype=np.float64)
    std = global_moments(comm, a)[1]
    err = comm.allreduce(float((np.abs(a - b) / std).max()), op=MPI.MAX)
    assert 0 < err < 2e-5


def test_fft_precision_config():
    from lagbias_mpi.config.train import FeatureConfig

    assert FeatureConfig().fft_dtype == np.float64
    assert FeatureConfig(fft_precision="float32").fft_dtype == np.float32
    with pytest.raises(ValueError, match="features.fft_precision"):
        FeatureConfig(fft_precision="float16")
