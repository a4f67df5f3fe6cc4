"""The Watson et al. (2013) universal FoF halo mass function and the comparison with a catalogue.

dn/dlnM = f(sigma) rho_m / M |dln sigma / dln M|,
f(sigma) = A [(beta/sigma)^alpha + 1] exp(-gamma/sigma^2), A = 0.282, alpha = 2.163, beta = 1.406,
gamma = 1.210 (their FoF fit, linking length 0.2), sigma(M) the rms linear overdensity in top-hat
spheres holding mass M.
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.nbody.cosmology import Cosmology, sigma_tophat

WATSON13_FOF = {"A": 0.282, "alpha": 2.163, "beta": 1.406, "gamma": 1.210}


def watson13_f(sigma: np.ndarray) -> np.ndarray:
    """Watson et al. 2013 FoF multiplicity function f(sigma)."""
    p = WATSON13_FOF
    sigma = np.asarray(sigma, dtype=np.float64)
    return p["A"] * ((p["beta"] / sigma) ** p["alpha"] + 1.0) * np.exp(-p["gamma"] / sigma**2)


def dn_dlnm(cosmo: Cosmology, mass: np.ndarray, z: float, growth_ratio: float = 1.0) -> np.ndarray:
    """Halo number density per ln M in (h/Mpc)^3 at masses ``mass`` Msun/h and redshift ``z``
    (linear P from the table growth, times ``growth_ratio`` in amplitude)."""
    mass = np.asarray(mass, dtype=np.float64)
    lnm = np.log(mass)
    eps = 0.01
    radius = lambda m: (3 * m / (4 * np.pi * cosmo.rho_m)) ** (1 / 3)  # noqa: E731
    sig = sigma_tophat(cosmo, radius(mass), z, growth_ratio)
    sig_hi = sigma_tophat(cosmo, radius(np.exp(lnm + eps)), z, growth_ratio)
    sig_lo = sigma_tophat(cosmo, radius(np.exp(lnm - eps)), z, growth_ratio)
    dlnsig = np.abs(np.log(sig_hi) - np.log(sig_lo)) / (2 * eps)
    return watson13_f(sig) * cosmo.rho_m / mass * dlnsig


def hmf_comparison(cosmo: Cosmology, npart: np.ndarray, particle_mass: float, box: float, z: float,
                   min_npart: int = 100, bins_per_decade: int = 4, growth_ratio: float = 1.0,
                   min_halos: int = 1) -> list[dict]:
    """Measured / Watson13 number of halos per mass bin for halos of at least ``min_npart``
    particles (mass N x particle_mass). Bins with fewer than ``min_halos`` halos are left out."""
    mass = np.asarray(npart, dtype=np.float64) * particle_mass
    sel = np.asarray(npart) >= min_npart
    if not sel.any():
        return []
    lo = np.log10(min_npart * particle_mass)
    hi = np.log10(mass[sel].max())
    edges = lo + np.arange(int(np.floor((hi - lo) * bins_per_decade)) + 2) / bins_per_decade
    counts, _ = np.histogram(np.log10(mass[sel]), bins=edges)
    out = []
    for i, c in enumerate(counts):
        if c < min_halos:
            continue
        lnm = np.linspace(edges[i], edges[i + 1], 9) * np.log(10)
        expected = np.trapezoid(dn_dlnm(cosmo, np.exp(lnm), z, growth_ratio), lnm) * box**3
        out.append({"m_lo": float(10 ** edges[i]), "m_hi": float(10 ** edges[i + 1]), "n_halos": int(c),
                    "n_expected": float(expected), "ratio": float(c / expected),
                    "poisson_error": float(np.sqrt(c) / expected)})
    return out
