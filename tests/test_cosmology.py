"""Cosmology, growth and the Watson13 mass function (serial)."""
import numpy as np
import pytest
from scipy.integrate import quad

from lagbias_mpi.nbody.cosmology import CosmologyError, load_cosmology, sigma_tophat
from lagbias_mpi.nbody.hmf import dn_dlnm, watson13_f

NAME = "AbacusSummit_base_c000_ph000"


@pytest.fixture(scope="module")
def cosmo():
    return load_cosmology(NAME)


def test_sigma8_matches_planck2018(cosmo):
    # AbacusSummit c000 is Planck 2018 with sigma8 = 0.8114: checks the units of the CLASS table
    assert cosmo.sigma8 == pytest.approx(0.8114, rel=2e-3)
    assert cosmo.omega_m == pytest.approx(0.315192)
    assert float(sigma_tophat(cosmo, np.array([8.0]), 1.0)[0]) == pytest.approx(0.4930, rel=2e-3)


def test_linear_power_scaling(cosmo):
    k = np.array([0.01, 0.1, 1.0])
    ratio = cosmo.linear_power(k, 99.0) / cosmo.linear_power(k, 1.0)
    expected = (cosmo.table_growth(99.0) / cosmo.table_growth(1.0)) ** 2
    np.testing.assert_allclose(ratio, expected, rtol=1e-12)
    assert cosmo.linear_power(np.array([0.0]), 1.0)[0] == 0.0
    with pytest.raises(CosmologyError, match="outside the growth table"):
        cosmo.table_growth(150.0)


def test_growth_of_the_dynamics(cosmo):
    # D1 -> a at early times; f1 and the FastPM factors agree with numerical derivatives/integrals
    assert cosmo.growth(1e-3) == pytest.approx(1e-3, rel=1e-3)
    a, h = 0.4, 1e-5
    f_num = (np.log(cosmo.growth(a + h)) - np.log(cosmo.growth(a - h))) / (np.log(a + h) - np.log(a - h))
    assert cosmo.growth_rate(a) == pytest.approx(f_num, rel=1e-6)
    assert cosmo.gf(a) == pytest.approx((cosmo.gf_big(a + h) - cosmo.gf_big(a - h)) / (2 * h), rel=1e-6)
    # over a short step the FastPM factors equal the plain integrals of dx/da and dp/da
    a0, a1 = 0.5, 0.5001
    drift = quad(lambda x: 1 / (x**3 * cosmo.efunc(x)), a0, a1)[0]
    kick = quad(lambda x: 1 / (x**2 * cosmo.efunc(x)), a0, a1)[0]
    assert cosmo.drift_factor(a0, a1, 0.5 * (a0 + a1)) == pytest.approx(drift, rel=1e-6)
    assert cosmo.kick_factor(a0, a1, 0.5 * (a0 + a1)) == pytest.approx(kick, rel=1e-6)
    # matter + Lambda growth from z = 99 to 0.5 is within 2% of the header table (radiation, neutrinos)
    pm = cosmo.growth(1 / 1.5) / cosmo.growth(0.01)
    table = cosmo.table_growth(0.5) / cosmo.table_growth(99.0)
    assert pm / table == pytest.approx(1.0, abs=0.02)


def test_unknown_cosmology_is_refused():
    with pytest.raises(CosmologyError, match="unknown cosmology 'AbacusSummit_base_c999_ph000'.*get_meta"):
        load_cosmology("AbacusSummit_base_c999_ph000")


def test_watson13(cosmo):
    # f(sigma) of Watson et al. 2013 at sigma = 1, by hand
    assert watson13_f(1.0) == pytest.approx(0.282 * (1.406**2.163 + 1) * np.exp(-1.210), rel=1e-12)
    m = np.logspace(11, 15.5, 40)
    dn = dn_dlnm(cosmo, m, 0.0)
    assert np.all(np.diff(dn) < 0)
    # mass fraction in halos above 1e11 Msun/h at z = 0 is a sizeable part but below 1
    frac = np.trapezoid(dn * m, np.log(m)) / cosmo.rho_m
    assert 0.2 < frac < 0.8
    # number density of halos above 1e14 Msun/h at z = 0: ~ 1e-5 - 1e-4 (h/Mpc)^3
    sel = m >= 1e14
    n14 = np.trapezoid(dn[sel], np.log(m[sel]))
    assert 1e-5 < n14 < 1e-4
