"""Power and cross spectra of slab fields: equal to a direct numpy computation and to the
COMM_SELF result, unbiased on Gaussian random fields, CIC window compensation."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.mesh.paint import paint
from lagbias_mpi.mesh.power import (
    default_edges,
    mean_ratio_below,
    overdensity,
    power_spectrum,
)
from lagbias_mpi.mpi.fft import SlabFFT
from lagbias_mpi.mpi.layout import slab_bounds

BOX = 100.0


def direct_power(a, b, box, edges):
    """Numpy reference on the FULL complex grid (no Hermitian weights needed)."""
    n = a.shape[0]
    ak, bk = np.fft.fftn(a), np.fft.fftn(b)
    k1 = 2 * np.pi * np.fft.fftfreq(n, box / n)
    kmag = np.sqrt(k1[:, None, None] ** 2 + k1[None, :, None] ** 2 + k1[None, None, :] ** 2).ravel()
    prod = (ak * np.conj(bk)).real.ravel()
    which = np.digitize(kmag, edges)
    modes = np.bincount(which, minlength=len(edges) + 1)[1:-1]
    ksum = np.bincount(which, weights=kmag, minlength=len(edges) + 1)[1:-1]
    psum = np.bincount(which, weights=prod, minlength=len(edges) + 1)[1:-1]
    with np.errstate(invalid="ignore"):
        return ksum / modes, psum / modes * box**3 / n**6, modes


def local(comm, full):
    start, stop = slab_bounds(full.shape[0], comm.size, comm.rank)
    return np.ascontiguousarray(full[start:stop])


@pytest.mark.mpi
@pytest.mark.parametrize("n", [12, 15])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_power_equals_direct_numpy_and_self(comm, n, dtype):
    rng = np.random.default_rng(10)
    a = rng.standard_normal((n, n, n)).astype(dtype)
    b = (0.5 * a + rng.standard_normal((n, n, n))).astype(dtype)
    fft = SlabFFT(comm, n, BOX, dtype)
    edges = default_edges(n, BOX)
    res = power_spectrum(fft, local(comm, a), local(comm, b))
    k, p, modes = direct_power(a.astype(np.float64), b.astype(np.float64), BOX, edges)
    np.testing.assert_array_equal(res["modes"], modes)
    np.testing.assert_allclose(res["k"], k, rtol=1e-12)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    scale = np.abs(p).max()
    assert np.abs(res["power"] - p).max() <= tol * scale
    auto = power_spectrum(fft, local(comm, a))
    _, pa, _ = direct_power(a.astype(np.float64), a.astype(np.float64), BOX, edges)
    assert np.abs(auto["power"] - pa).max() <= tol * pa.max()
    # the cross spectrum of a field with itself is the auto spectrum
    np.testing.assert_allclose(power_spectrum(fft, local(comm, a), local(comm, a))["power"], auto["power"],
                               rtol=1e-12)
    ref = power_spectrum(SlabFFT(MPI.COMM_SELF, n, BOX, dtype), a, b)
    assert np.abs(res["power"] - ref["power"]).max() <= tol * scale
    np.testing.assert_array_equal(res["modes"], ref["modes"])


def test_default_edges():
    kf = 2 * np.pi / BOX
    edges = default_edges(16, BOX)
    np.testing.assert_allclose(np.diff(edges), kf)
    assert edges[0] == pytest.approx(kf / 2)
    assert edges[-1] <= np.pi * 16 / BOX + 1e-12  # up to the Nyquist wavenumber
    np.testing.assert_allclose(default_edges(16, BOX, dk=2 * kf, kmax=0.2), 2 * kf * (np.arange(2) + 0.5))


@pytest.mark.mpi
def test_custom_edges_and_empty_bins(comm):
    n = 8
    fft = SlabFFT(comm, n, BOX)
    a = local(comm, np.random.default_rng(11).standard_normal((n, n, n)))
    kf = fft.kf
    edges = np.array([0.5, 1.2, 1.3, 2.5]) * kf  # the middle bin holds no mode
    res = power_spectrum(fft, a, edges=edges)
    assert res["modes"][1] == 0 and np.isnan(res["power"][1]) and np.isnan(res["k"][1])
    assert res["modes"][0] == 6 and res["modes"][2] == 12 + 8 + 6 + 24 + 24  # |m|^2 = 1; 2..6
    np.testing.assert_allclose(res["k"][0], kf)


def gaussian_field(n, box, pk, seed):
    """Serial numpy draw of a Gaussian random field with power spectrum ``pk(k)`` (Mpc/h)^3."""
    white = np.random.default_rng(seed).standard_normal((n, n, n))
    k1 = 2 * np.pi * np.fft.fftfreq(n, box / n)
    kz = 2 * np.pi * np.fft.rfftfreq(n, box / n)
    k = np.sqrt(k1[:, None, None] ** 2 + k1[None, :, None] ** 2 + kz[None, None, :] ** 2)
    amp = np.zeros_like(k)
    amp[k > 0] = np.sqrt(pk(k[k > 0]) * n**3 / box**3)
    return np.fft.irfftn(np.fft.rfftn(white) * amp, s=(n, n, n), axes=(0, 1, 2))


def expected_binned(n, box, pk, edges):
    """Mode average of pk over each bin (the full grid)."""
    k1 = 2 * np.pi * np.fft.fftfreq(n, box / n)
    kmag = np.sqrt(k1[:, None, None] ** 2 + k1[None, :, None] ** 2 + k1[None, None, :] ** 2).ravel()
    which = np.digitize(kmag, edges)
    sel = which > 0
    modes = np.bincount(which[sel], minlength=len(edges) + 1)[1:-1]
    return np.bincount(which[sel], weights=pk(kmag[sel]), minlength=len(edges) + 1)[1:-1] / modes


@pytest.mark.mpi
def test_gaussian_field_recovers_its_power(comm):
    """chi^2 of the measured P(k) against the input, with the variance 2 P^2 / modes per bin."""
    n = 32

    def pk(k):
        return 2.0e3 * (k / 0.1) ** -1.5 * np.exp(-((k / 1.0) ** 2))

    full = gaussian_field(n, BOX, pk, seed=12)
    res = power_spectrum(SlabFFT(comm, n, BOX), local(comm, full))
    expect = expected_binned(n, BOX, pk, res["edges"])
    chi = (res["power"] - expect) / (expect * np.sqrt(2.0 / res["modes"]))
    dof = len(chi)
    assert abs(np.sum(chi**2) - dof) < 4 * np.sqrt(2 * dof), (np.sum(chi**2), dof)
    assert np.abs(chi).max() < 4.5
    assert mean_ratio_below(res["k"], res["power"] / expect, kmax=1.0) == pytest.approx(1.0, abs=0.05)


@pytest.mark.mpi
def test_cic_compensation_of_a_painted_wave(comm):
    """Particles finely sampling 1 + A cos(k0 x): the CIC-painted field has P reduced by W_cic^2,
    and compensate='cic' restores the power of the exact field (up to sub-percent aliasing)."""
    n, m, amp = 16, 8, 0.3
    cell = BOX / n
    fft = SlabFFT(comm, n, BOX)
    k0 = 3 * fft.kf
    xs = -BOX / 2 + (np.arange(n * m) + 0.5) * cell / m
    yz = -BOX / 2 + (np.arange(n) + 0.3) * cell
    gx, gy, gz = np.meshgrid(xs, yz, yz, indexing="ij")
    pos = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)
    w = 1 + amp * np.cos(k0 * pos[:, 0])
    mine = slice(comm.rank * len(pos) // comm.size, (comm.rank + 1) * len(pos) // comm.size)
    delta = overdensity(comm, paint(comm, pos[mine], w[mine], n, BOX, "cic"))
    x = -BOX / 2 + np.arange(n) * cell
    exact = local(comm, np.broadcast_to(amp * np.cos(k0 * x)[:, None, None], (n, n, n)))
    p_exact = power_spectrum(fft, exact)["power"]
    p_raw = power_spectrum(fft, delta)["power"]
    p_comp = power_spectrum(fft, delta, compensate="cic")["power"]
    b = 2  # the bin centred on 3 k_f
    window2 = np.sinc(k0 * cell / (2 * np.pi)) ** 4
    assert p_raw[b] / p_exact[b] == pytest.approx(window2, rel=5e-3)
    assert p_comp[b] / p_exact[b] == pytest.approx(1.0, rel=5e-3)
    assert window2 < 0.8  # the test can tell the two apart


def test_bad_arguments():
    fft = SlabFFT(MPI.COMM_SELF, 8, BOX)
    with pytest.raises(ValueError, match="compensate"):
        power_spectrum(fft, np.zeros((8, 8, 8)), compensate="tsc")
    with pytest.raises(ValueError, match="empty"):
        overdensity(MPI.COMM_SELF, np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="too small"):
        mean_ratio_below(np.array([0.2, 0.3]), np.array([1.0, 1.0]))
