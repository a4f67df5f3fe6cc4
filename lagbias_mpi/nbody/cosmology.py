"""Background cosmology, linear growth and the linear power spectrum of an AbacusSummit cosmology.

The linear P(k) is the CLASS spectrum at z = 1 that abacusutils' ``abacusnbody.metadata.get_meta``
carries in every AbacusSummit header (k in h/Mpc, P in (Mpc/h)^3; its sigma8 scaled to z = 0 with
the header's ``GrowthTable`` reproduces the published sigma8, e.g. 0.8114 for c000). It is scaled to
the initial redshift with that growth table (which includes radiation and neutrinos).

The particle-mesh dynamics use a flat matter + Lambda background (E(a) = sqrt(Om a^-3 + 1 - Om),
radiation ignored) with its own linear growth D(a) (normalised to D = a at early times), its growth
rate f(a) and the FastPM growth-matched kick/drift factors. Time is in units of 1/H0, lengths in
Mpc/h, so velocities in 100 km/s; momentum p = a^2 dx/dt.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.integrate import quad

RHO_CRIT = 2.77536627e11  # critical density today in h^2 Msun / Mpc^3 -> (Msun/h) / (Mpc/h)^3


class CosmologyError(ValueError):
    """Unknown cosmology or unusable header; the message says how to find valid names."""


@dataclass(frozen=True)
class Cosmology:
    """The parameters the simulation needs, plus the tabulated linear P(k) at ``z_pk``."""

    name: str
    omega_m: float  # Omega_M today (cdm + baryons + massive neutrinos)
    h: float
    n_s: float
    sigma8: float  # of the CLASS spectrum scaled to z = 0 with the growth table
    z_pk: float  # redshift of the tabulated P(k) (1 for AbacusSummit)
    k: np.ndarray  # h/Mpc
    pk: np.ndarray  # (Mpc/h)^3 at z_pk
    growth_z: np.ndarray  # growth table redshifts (increasing)
    growth_d: np.ndarray  # growth table D(z), arbitrary normalisation

    def params(self) -> dict:
        """JSON-able parameters (stored in the simulation file's ``cosmology`` attribute)."""
        return {"name": self.name, "Omega_M": self.omega_m, "h": self.h, "n_s": self.n_s,
                "sigma8": self.sigma8, "z_pk": self.z_pk, "source": "abacusnbody.metadata.get_meta"}

    # ---- table growth (used to scale the CLASS P(k)) -------------------------------------------
    def table_growth(self, z: float) -> float:
        """D(z) from the header's growth table (log-log interpolation in 1 + z)."""
        zs, ds = self.growth_z, self.growth_d
        if not zs[0] <= z <= zs[-1]:
            raise CosmologyError(f"redshift {z} outside the growth table range [{zs[0]}, {zs[-1]}]")
        return float(np.exp(np.interp(np.log1p(z), np.log1p(zs), np.log(ds))))

    def linear_power(self, k: np.ndarray, z: float) -> np.ndarray:
        """Linear P(k) in (Mpc/h)^3 at redshift ``z`` (table growth); k in h/Mpc; 0 at k = 0."""
        k = np.asarray(k, dtype=np.float64)
        scale = (self.table_growth(z) / self.table_growth(self.z_pk)) ** 2
        with np.errstate(divide="ignore"):
            logp = np.interp(np.log(np.where(k > 0, k, 1.0)), np.log(self.k), np.log(self.pk))
        return np.where(k > 0, np.exp(logp) * scale, 0.0)

    # ---- matter + Lambda background used by the dynamics ---------------------------------------
    def efunc(self, a):
        """H(a)/H0 for flat matter + Lambda."""
        a = np.asarray(a, dtype=np.float64)
        return np.sqrt(self.omega_m / a**3 + 1.0 - self.omega_m)

    def omega_m_a(self, a):
        """Omega_m(a)."""
        a = np.asarray(a, dtype=np.float64)
        return self.omega_m / a**3 / self.efunc(a) ** 2

    def growth(self, a: float) -> float:
        """Linear growth D1(a) of matter + Lambda, normalised to D1 -> a at early times."""
        return _growth(self.omega_m, float(a))

    def growth_rate(self, a: float) -> float:
        """f1 = dln D1 / dln a (exact for matter + Lambda)."""
        om = float(self.omega_m_a(a))
        return -1.5 * om + 2.5 * om * a / self.growth(a)

    def growth_rate2(self, a: float) -> float:
        """f2 = dln D2 / dln a ~ 2 Omega_m(a)^(6/11) (Bouchet et al. 1995)."""
        return 2.0 * float(self.omega_m_a(a)) ** (6.0 / 11.0)

    def d2_factor(self, a: float) -> float:
        """D2 / D1^2 ~ -3/7 Omega_m(a)^(-1/143)."""
        return -3.0 / 7.0 * float(self.omega_m_a(a)) ** (-1.0 / 143.0)

    # FastPM growth-matched operators (Feng et al. 2016): Gp = D1, gp = dD1/da,
    # Gf = a^3 E dD1/da, gf = dGf/da = 1.5 Om D1 / (a^2 E) (the growth equation)
    def gp(self, a: float) -> float:
        return self.growth_rate(a) * self.growth(a) / a

    def gf_big(self, a: float) -> float:
        return a**3 * float(self.efunc(a)) * self.gp(a)

    def gf(self, a: float) -> float:
        return 1.5 * self.omega_m * self.growth(a) / (a**2 * float(self.efunc(a)))

    def drift_factor(self, a0: float, a1: float, ac: float) -> float:
        """x += p * factor: FastPM drift from a0 to a1 with the momentum taken at ac."""
        return (self.growth(a1) - self.growth(a0)) / self.gp(ac) / (ac**3 * float(self.efunc(ac)))

    def kick_factor(self, a0: float, a1: float, ac: float) -> float:
        """p += F * factor: FastPM kick from a0 to a1 with the force taken at ac."""
        return (self.gf_big(a1) - self.gf_big(a0)) / self.gf(ac) / (ac**2 * float(self.efunc(ac)))

    def particle_mass(self, box: float, ppd: int) -> float:
        """Mass of one particle of a ppd^3 lattice in a box of ``box`` Mpc/h, in Msun/h."""
        return RHO_CRIT * self.omega_m * (box / ppd) ** 3

    @property
    def rho_m(self) -> float:
        """Mean comoving matter density in (Msun/h) / (Mpc/h)^3."""
        return RHO_CRIT * self.omega_m


@functools.lru_cache(maxsize=4096)
def _growth(omega_m: float, a: float) -> float:
    e = lambda x: np.sqrt(omega_m / x**3 + 1.0 - omega_m)  # noqa: E731
    integral = quad(lambda x: 1.0 / (x * e(x)) ** 3, 0.0, a, epsabs=0, epsrel=1e-10, limit=200)[0]
    return float(2.5 * omega_m * e(a) * integral)


def sigma_tophat(cosmo: Cosmology, radius: np.ndarray, z: float, growth_ratio: float = 1.0) -> np.ndarray:
    """rms linear overdensity in top-hat spheres of ``radius`` Mpc/h at ``z`` (table growth),
    times ``growth_ratio`` (to switch to another growth history)."""
    lnk = np.linspace(np.log(1e-4), np.log(50.0), 4000)
    k = np.exp(lnk)
    pk = cosmo.linear_power(k, z)
    x = np.outer(np.atleast_1d(radius), k)
    w = 3 * (np.sin(x) - x * np.cos(x)) / x**3
    s2 = np.trapezoid(k**3 * pk * w**2 / (2 * np.pi**2), lnk, axis=1)
    return np.sqrt(s2) * growth_ratio


@functools.lru_cache(maxsize=8)
def load_cosmology(name: str) -> Cosmology:
    """Cosmology of the AbacusSummit simulation ``name`` (e.g. ``AbacusSummit_base_c000_ph000``)."""
    try:
        from abacusnbody.metadata import get_meta
    except ImportError as exc:  # pragma: no cover
        raise CosmologyError(f"abacusutils is needed for the cosmology {name!r}: {exc}") from None
    try:
        meta = get_meta(name, redshift=None)
    except (ValueError, KeyError) as exc:
        raise CosmologyError(
            f"unknown cosmology {name!r} ({exc}). Valid names are AbacusSummit simulation names such "
            "as 'AbacusSummit_base_c000_ph000'; list them with "
            "`python -c \"from abacusnbody.metadata import get_meta; help(get_meta)\"` or see "
            "https://abacussummit.readthedocs.io/en/latest/simulations.html") from None
    try:
        table = meta["CLASS_power_spectrum"]
        k = np.asarray(table["k (h/Mpc)"], dtype=np.float64)
        pk = np.asarray(table["P (Mpc/h)^3"], dtype=np.float64)
        growth = meta["GrowthTable"]
        zs = np.array(sorted(growth), dtype=np.float64)
        ds = np.array([growth[z] for z in sorted(growth)], dtype=np.float64)
        cosmo = Cosmology(name=name, omega_m=float(meta["Omega_M"]), h=float(meta["H0"]) / 100.0,
                          n_s=float(meta["n_s"]), sigma8=0.0, z_pk=float(meta["CLASS_Redshift"]),
                          k=k, pk=pk, growth_z=zs, growth_d=ds)
    except KeyError as exc:
        raise CosmologyError(f"header of {name!r} lacks {exc}; cannot build its linear P(k)") from None
    s8 = float(sigma_tophat(cosmo, np.array([8.0]), 0.0)[0])
    return Cosmology(**{**cosmo.__dict__, "sigma8": s8})
