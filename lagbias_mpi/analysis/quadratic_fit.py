"""The best f of the form exp(quadratic in the network inputs), by least squares over all ranks'
particles: the floor the inputs set for recovering a planted truth (exp of a quadratic in nu and
lambda), next to what training reaches (``bench --recovery``).
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.mpi.comm import global_sum


def quadratic_design(theta: np.ndarray) -> np.ndarray:
    """Columns 1, theta_a, theta_a theta_b (a <= b) of the rows of ``theta`` (float64)."""
    x = np.asarray(theta, np.float64)
    n = x.shape[1]
    cols = [np.ones(len(x))] + [x[:, a] for a in range(n)] + [x[:, a] * x[:, b] for a in range(n) for b in range(a, n)]
    return np.stack(cols, axis=1)


def fit_quadratic_log(comm, theta: np.ndarray, f_true: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """Least-squares coefficients of ln f_true on :func:`quadratic_design` over all ranks' particles
    (normal equations in chunks, one Allreduce, collective). Exact when ln f_true is a quadratic of
    the inputs; its residual otherwise measures what the inputs cannot represent."""
    m = quadratic_design(theta[:1]).shape[1]
    ata, aty = np.zeros((m, m)), np.zeros(m)
    for lo in range(0, len(theta), chunk):
        a = quadratic_design(theta[lo:lo + chunk])
        ata += a.T @ a
        aty += a.T @ np.log(np.asarray(f_true[lo:lo + chunk], np.float64))
    tot = global_sum(comm, np.concatenate([ata.ravel(), aty]))
    return np.linalg.solve(tot[:m * m].reshape(m, m), tot[m * m:])


def best_quadratic_f(theta: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """f = exp(quadratic_design(theta) @ coef) of the rows of ``theta``."""
    return np.exp(quadratic_design(theta) @ coef)
