"""Distributed r2c/c2r FFT and its Fourier kernels: gathered results on 1/2/3 ranks equal the
COMM_SELF result and numpy."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.mpi.comm import gather_slabs
from lagbias_mpi.mpi.fft import (
    SlabFFT,
    gaussian_window,
    laplacian_kernel,
    smooth,
    tidal_kernel,
)

BOX = 50.0


def gather_complex(fft, arr):
    """Full half-complex array from the local Fourier slabs (cut along axis 1)."""
    parts = fft.comm.allgather((fft.complex_slab, arr))
    full = np.empty((fft.n, fft.n, fft.n // 2 + 1), arr.dtype)
    for sl, a in parts:
        full[sl] = a
    return full


def local_real(fft, full):
    return np.ascontiguousarray(full[fft.real_start:fft.real_stop])


def random_field(n, dtype, seed=1):
    return np.random.default_rng(seed).standard_normal((n, n, n)).astype(dtype)


def grid_x(fft):
    """Positions (Mpc/h) of the grid points of the local real slab, broadcastable."""
    x = -fft.box / 2 + np.arange(fft.n) * fft.cell
    return x[fft.real_start:fft.real_stop, None, None], x[None, :, None], x[None, None, :]


@pytest.mark.mpi
@pytest.mark.parametrize("n", [8, 9, 10])
@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-12)])
def test_forward_equals_self_and_numpy(comm, n, dtype, rtol):
    full = random_field(n, dtype)
    fft = SlabFFT(comm, n, BOX, dtype)
    assert fft.real_shape == (fft.real_stop - fft.real_start, n, n)
    fk = fft.forward(local_real(fft, full))
    assert fk.shape == fft.complex_shape
    assert fk.dtype == (np.complex64 if dtype == np.float32 else np.complex128)
    got = gather_complex(fft, fk)
    ref_self = SlabFFT(MPI.COMM_SELF, n, BOX, dtype).forward(full)
    ref_np = np.fft.rfftn(full.astype(np.float64))
    scale = np.abs(ref_np).max()
    assert np.abs(got - ref_self).max() <= rtol * scale
    assert np.abs(got - ref_np).max() <= rtol * scale


@pytest.mark.mpi
@pytest.mark.parametrize("n", [8, 9, 10])
@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_round_trip_and_backward(comm, n, dtype, rtol):
    full = random_field(n, dtype, seed=2)
    fft = SlabFFT(comm, n, BOX, dtype)
    local = local_real(fft, full)
    fk = fft.forward(local)
    fk_before = fk.copy()
    back = fft.backward(fk)
    np.testing.assert_array_equal(fk, fk_before)  # backward leaves its input alone
    assert back.dtype == dtype and back.shape == fft.real_shape
    assert np.abs(back - local).max() <= rtol * np.abs(full).max()
    # backward of a given spectrum equals numpy's irfftn, gathered
    spec = np.fft.rfftn(random_field(n, np.float64, seed=3))
    mine = spec[fft.complex_slab].astype(fk.dtype)
    got = gather_slabs(comm, fft.backward(mine))
    ref = np.fft.irfftn(spec, s=(n, n, n), axes=(0, 1, 2))
    assert np.abs(got - ref).max() <= 10 * rtol * np.abs(ref).max()


@pytest.mark.mpi
@pytest.mark.parametrize("n", [8, 9])
def test_local_k_matches_fftfreq(comm, n):
    fft = SlabFFT(comm, n, BOX, np.float64)
    kx, ky, kz = fft.local_k()
    kf = 2 * np.pi / BOX
    sx, sy, sz = fft.complex_slab
    np.testing.assert_allclose(kx.ravel(), 2 * np.pi * np.fft.fftfreq(n, BOX / n)[sx], rtol=1e-12)
    np.testing.assert_allclose(ky.ravel(), 2 * np.pi * np.fft.fftfreq(n, BOX / n)[sy], rtol=1e-12)
    np.testing.assert_allclose(kz.ravel(), 2 * np.pi * np.fft.rfftfreq(n, BOX / n)[sz], rtol=1e-12)
    assert fft.kf == pytest.approx(kf) and fft.cell == pytest.approx(BOX / n)
    np.testing.assert_allclose(fft.local_k2(), kx**2 + ky**2 + kz**2)
    # Hermitian weights count every mode of the full complex grid exactly once
    total = comm.allreduce(float(np.broadcast_to(fft.hermitian_weights(), fft.complex_shape).sum()))
    assert total == n**3


def plane_wave(fft, m):
    """cos(k.x) on the local slab for k = k_f * m, and that k."""
    x = grid_x(fft)
    k = [fft.kf * mi for mi in m]
    return np.cos(k[0] * x[0] + k[1] * x[1] + k[2] * x[2]), np.array(k)


@pytest.mark.mpi
def test_gaussian_smoothing_and_laplacian_of_plane_wave(comm):
    fft = SlabFFT(comm, 12, BOX, np.float64)
    wave, k = plane_wave(fft, (1, -2, 3))
    k2 = float(k @ k)
    radius = 4.0
    sm = smooth(fft, fft.forward(wave), radius)
    np.testing.assert_allclose(sm, np.exp(-0.5 * k2 * radius**2) * wave, atol=1e-12)
    lap = fft.backward(fft.forward(wave) * laplacian_kernel(fft.local_k2()))
    np.testing.assert_allclose(lap, -k2 * wave, atol=1e-10)
    assert gaussian_window(np.array(0.0), 3.0) == 1.0
    with pytest.raises(ValueError, match="radius"):
        gaussian_window(fft.local_k2(), -1.0)


@pytest.mark.mpi
def test_tidal_kernel(comm):
    fft = SlabFFT(comm, 10, BOX, np.float64)
    k2 = fft.local_k2()
    trace = sum(tidal_kernel(fft, i, i) for i in range(3))
    np.testing.assert_allclose(trace[k2 > 0], 1.0, rtol=1e-12)
    assert np.all(trace[k2 == 0] == 0)
    for i in range(3):
        for j in range(3):
            np.testing.assert_array_equal(tidal_kernel(fft, i, j), tidal_kernel(fft, j, i))
    wave, k = plane_wave(fft, (2, 1, -1))
    wk = fft.forward(wave)
    for i, j in [(0, 0), (0, 1), (1, 2)]:
        got = fft.backward(wk * tidal_kernel(fft, i, j))
        np.testing.assert_allclose(got, k[i] * k[j] / (k @ k) * wave, atol=1e-12)


@pytest.mark.mpi
def test_smoothing_equals_self(comm):
    n = 10
    full = random_field(n, np.float32, seed=4)
    fft = SlabFFT(comm, n, BOX, np.float32)
    got = gather_slabs(comm, smooth(fft, fft.forward(local_real(fft, full)), 3.0))
    fself = SlabFFT(MPI.COMM_SELF, n, BOX, np.float32)
    ref = smooth(fself, fself.forward(full), 3.0)
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.mpi(min_size=3)
def test_more_ranks_than_planes_refused(comm):
    with pytest.raises(ValueError, match="ranks > N"):
        SlabFFT(comm, 2, BOX)


def test_bad_arguments_refused():
    with pytest.raises(ValueError, match="at least 2"):
        SlabFFT(MPI.COMM_SELF, 1, BOX)
    with pytest.raises(ValueError, match="dtype"):
        SlabFFT(MPI.COMM_SELF, 4, BOX, np.int32)
    with pytest.raises(ValueError, match="backend"):
        SlabFFT(MPI.COMM_SELF, 4, BOX, backend="no-such-fft")
    fft = SlabFFT(MPI.COMM_SELF, 4, BOX)
    with pytest.raises(ValueError, match="shape"):
        fft.forward(np.zeros((4, 4, 5), np.float32))
    with pytest.raises(ValueError, match="shape"):
        fft.backward(np.zeros((4, 4, 4), np.complex64))
    assert fft.backend["name"] == "mpi4py-fft" and fft.backend["version"]


def test_planner_effort_from_the_environment(monkeypatch):
    from lagbias_mpi.mpi.fft_backends import PLANNER_ENV, planner_effort

    monkeypatch.delenv(PLANNER_ENV, raising=False)
    assert planner_effort() == "FFTW_MEASURE"
    monkeypatch.setenv(PLANNER_ENV, "fftw_estimate")
    assert planner_effort() == "FFTW_ESTIMATE"
    monkeypatch.setenv(PLANNER_ENV, "FFTW_FAST")
    with pytest.raises(ValueError, match="LAGBIAS_FFTW_PLANNER"):
        planner_effort()


def test_estimate_planner_is_bitwise_reproducible_across_processes():
    """With LAGBIAS_FFTW_PLANNER=FFTW_ESTIMATE separate processes give bitwise the same transform."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, numpy as np; from mpi4py import MPI; from lagbias_mpi.mpi.fft import SlabFFT; "
            "f = SlabFFT(MPI.COMM_SELF, 48, 100.0, np.float32); "
            "x = np.random.default_rng(1).standard_normal((48, 48, 48)).astype(np.float32); "
            "print(hashlib.md5(np.ascontiguousarray(f.forward(x)).tobytes()).hexdigest())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
    env["LAGBIAS_FFTW_PLANNER"] = "FFTW_ESTIMATE"
    out = {subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip() for _ in range(3)}
    assert len(out) == 1 and len(next(iter(out))) == 32
