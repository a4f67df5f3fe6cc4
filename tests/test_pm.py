"""Initial conditions, 2LPT and the particle-mesh force: rank independence and physics."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.mesh.grid import wrap_centred as wrap
from lagbias_mpi.mesh.power import power_spectrum
from lagbias_mpi.mpi.comm import gather_slabs
from lagbias_mpi.mpi.fft import SlabFFT
from lagbias_mpi.nbody.cosmology import load_cosmology
from lagbias_mpi.nbody.ics import gaussian_field, white_noise
from lagbias_mpi.nbody.lpt import lattice_for_slab, lattice_position, lpt_displacements
from lagbias_mpi.nbody.pm import ForceMesh, PMParticles, evolve, route

NAME = "AbacusSummit_base_c000_ph000"


@pytest.fixture(scope="module")
def cosmo():
    return load_cosmology(NAME)


def test_white_noise_is_keyed_by_global_index():
    full = white_noise(7, 12, 0, 12)
    np.testing.assert_array_equal(white_noise(7, 12, 5, 9), full[5:9])
    assert not np.allclose(white_noise(8, 12, 0, 12), full)
    assert abs(full.mean()) < 0.1 and abs(full.std() - 1) < 0.05


@pytest.mark.mpi
def test_gaussian_field_same_on_all_rank_counts(comm, cosmo):
    """As pmesh's test_generate_3d: each rank's slab equals the matching slice of the 1-rank field."""
    n, box = 32, 64.0
    power = lambda k: cosmo.linear_power(k, 99.0)  # noqa: E731
    mine, _ = gaussian_field(SlabFFT(comm, n, box, np.float32), power, 11)
    whole, _ = gaussian_field(SlabFFT(MPI.COMM_SELF, n, box, np.float32), power, 11)
    fft = SlabFFT(comm, n, box, np.float32)
    np.testing.assert_allclose(mine, whole[fft.real_start:fft.real_stop], rtol=0, atol=1e-5 * np.abs(whole).max())


def test_initial_power_matches_input_within_sample_variance(cosmo):
    n, box = 64, 128.0
    power = lambda k: cosmo.linear_power(k, 99.0)  # noqa: E731
    fft = SlabFFT(MPI.COMM_SELF, n, box, np.float64)
    delta, _ = gaussian_field(fft, power, 3)
    meas = power_spectrum(fft, delta)
    ok = meas["modes"] > 0
    ratio = meas["power"][ok] / power(meas["k"][ok])
    sigma = np.sqrt(2.0 / meas["modes"][ok])  # Gaussian sample variance of each bin (in modes)
    pull = (ratio - 1) / sigma
    assert np.all(np.abs(pull) < 4.5), pull
    assert abs(np.mean(pull)) < 4.0 / np.sqrt(len(pull))  # no overall amplitude bias
    chi2 = float(np.sum(pull**2)) / len(pull)
    assert 0.5 < chi2 < 1.6


def _plane_wave_particles(comm, ppd, n_ic, box, m, amp):
    fft = SlabFFT(comm, n_ic, box, np.float64)
    lagr = lattice_for_slab(ppd, n_ic, fft.real_start, fft.real_stop)
    q = lattice_position(lagr, ppd, box)
    k = 2 * np.pi / box * m
    psi = np.zeros_like(q)
    psi[:, 0] = amp / k * np.sin(k * q[:, 0] + 0.3)
    return PMParticles(wrap(q + psi, box), np.zeros_like(q), lagr), psi


@pytest.mark.mpi
def test_force_of_a_plane_wave(comm, cosmo):
    """Zel'dovich plane wave: F = 1.5 Omega_m psi at low k (linear theory), on any number of ranks."""
    ppd, box = 16, 64.0
    parts, _ = _plane_wave_particles(comm, ppd, 32, box, 1, 1e-3)
    mesh = ForceMesh(comm, 32, box, cosmo.omega_m, ppd**3)
    parts = route(comm, parts, 32, box)
    force = mesh.force(parts.pos)
    psi = wrap(parts.pos - lattice_position(parts.lagr, ppd, box), box)
    num = comm.allreduce(np.sum(force[:, 0] * psi[:, 0]))
    den = comm.allreduce(np.sum(psi[:, 0] ** 2))
    # 2% above linear theory at k = 0.2 k_Nyquist of the lattice: the discreteness of a perturbed
    # lattice (Joyce & Marcos 2007), which a mesh twice finer than the lattice resolves
    assert num / den == pytest.approx(1.5 * cosmo.omega_m, rel=0.03)
    fmax = comm.allreduce(float(np.abs(force[:, 0]).max(initial=0)), op=MPI.MAX)
    assert comm.allreduce(float(np.abs(force[:, 1:]).max(initial=0)), op=MPI.MAX) < 1e-5 * fmax


@pytest.mark.mpi
def test_2lpt_and_pm_same_on_all_rank_counts(comm, cosmo):
    """2LPT + a few PM steps: gathered particles (sorted by lattice index) equal the 1-rank run;
    total momentum stays ~0; the particle count is conserved."""
    ppd, n_ic, box = 16, 32, 64.0
    power = lambda k: cosmo.linear_power(k, 99.0)  # noqa: E731

    def run(c):
        fft = SlabFFT(c, n_ic, box, np.float32)
        _, delta_k = gaussian_field(fft, power, 5)
        lagr = lattice_for_slab(ppd, n_ic, fft.real_start, fft.real_stop)
        psi1, psi2 = lpt_displacements(fft, delta_k, lagr, ppd)
        a = 0.01
        psi2 *= cosmo.d2_factor(a)
        pos = wrap(lattice_position(lagr, ppd, box) + psi1 + psi2, box)
        mom = a**2 * float(cosmo.efunc(a)) * (cosmo.growth_rate(a) * psi1 + cosmo.growth_rate2(a) * psi2)
        parts, diag = evolve(c, PMParticles(pos, mom, lagr), cosmo, box, 32, a, 0.5, 4, ppd**3)
        key = (parts.lagr[:, 0].astype(np.int64) * ppd + parts.lagr[:, 1]) * ppd + parts.lagr[:, 2]
        allkey = np.concatenate(c.allgather(key))
        allpos = np.concatenate(c.allgather(parts.pos))
        order = np.argsort(allkey)
        return allkey[order], allpos[order], diag

    key, pos, diag = run(comm)
    key1, pos1, _ = run(MPI.COMM_SELF)
    np.testing.assert_array_equal(key, np.arange(ppd**3))
    np.testing.assert_array_equal(key, key1)
    d = wrap(pos - pos1, box)
    assert np.abs(d).max() < 1e-3  # Mpc/h: float32 FFT rounding, amplified by 4 PM steps
    assert diag["momentum"] < 1e-5
    # the particles moved: rms displacement from the lattice is several Mpc/h at a = 0.5
    q = lattice_position(np.stack(np.unravel_index(key, (ppd,) * 3), axis=1), ppd, box)
    assert 1.0 < np.sqrt(np.mean(wrap(pos - q, box) ** 2)) < 10.0


def test_field_gathered_from_slabs_is_real_and_zero_mean(cosmo):
    fft = SlabFFT(MPI.COMM_SELF, 16, 32.0, np.float64)
    delta, delta_k = gaussian_field(fft, lambda k: cosmo.linear_power(k, 0.0), 1)
    full = gather_slabs(MPI.COMM_SELF, delta)
    assert abs(full.mean()) < 1e-12
    np.testing.assert_allclose(np.fft.rfftn(full), delta_k, atol=1e-8 * np.abs(delta_k).max())
