"""Orthogonalisation of the raw features (paper eqs. 2.2-2.4) from the global particle covariance.

The raw columns fall into two blocks: the density block (``delta`` and ``lap`` at every scale) and
the tidal block (``g2`` or ``s2``). From the covariance of each block over all particles (one
Allreduce of the sums) we keep the ``n_scales + 1`` leading eigenvectors of the density block and all
eigenvectors of the tidal block, each scaled by Lambda^{-1/2}: theta = M (theta_raw - mu). Inside
each block the inputs have unit covariance (the blocks stay correlated with each other, as in the
paper). Eigenvector signs are fixed so that the largest-magnitude component is positive.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from lagbias_mpi.core.memory import ROWS_PER_STEP

DENSITY_KINDS = ("delta", "lap")


@dataclass(frozen=True)
class Orthogonaliser:
    """theta = matrix @ (raw - mean); matrix is (n_out, n_raw)."""

    matrix: np.ndarray
    mean: np.ndarray
    eigenvalues: np.ndarray  # eigenvalues kept, in output order

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, dtype=np.float64) - self.mean) @ self.matrix.T

    def to_dict(self) -> dict:
        return {"matrix": self.matrix, "mean": self.mean, "eigenvalues": self.eigenvalues}

    @classmethod
    def from_dict(cls, d: dict) -> "Orthogonaliser":
        return cls(np.asarray(d["matrix"], np.float64), np.asarray(d["mean"], np.float64),
                   np.asarray(d["eigenvalues"], np.float64))


COVARIANCE_CHUNK = ROWS_PER_STEP  # rows per step of the covariance sums


def global_covariance(comm, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean, covariance (1/N normalisation) and count of the rows of ``raw`` over all ranks, from one
    Allreduce of (N, sum x, sum x x^T) in float64 (the standardised features have mean ~0, so the
    one-pass formula loses no accuracy)."""
    m = raw.shape[1]
    s1, s2 = np.zeros(m), np.zeros((m, m))
    for lo in range(0, len(raw), COVARIANCE_CHUNK):  # float64 copies of one chunk at a time
        x = np.asarray(raw[lo:lo + COVARIANCE_CHUNK], dtype=np.float64)
        s1 += x.sum(axis=0)
        s2 += x.T @ x
    buf = np.concatenate([[len(raw)], s1, s2.ravel()])
    tot = np.empty_like(buf)
    comm.Allreduce(buf, tot, op=MPI.SUM)
    count = int(round(tot[0]))
    if count < 2:
        raise ValueError(f"covariance of {count} particles")
    mean = tot[1:1 + m] / count
    cov = tot[1 + m:].reshape(m, m) / count - np.outer(mean, mean)
    return mean, 0.5 * (cov + cov.T), count


def _fix_signs(vecs: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude component is positive."""
    idx = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[idx, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return vecs * signs


def _block(cov: np.ndarray, cols: list[int], keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (keep, len(cols)) of Lambda^{-1/2} V^T for the ``keep`` leading eigenvectors."""
    sub = cov[np.ix_(cols, cols)]
    vals, vecs = np.linalg.eigh(sub)
    order = np.argsort(vals)[::-1][:keep]
    vals, vecs = vals[order], _fix_signs(vecs[:, order])
    if np.any(vals <= 1e-12 * max(vals.max(), 1e-300)):
        raise ValueError(f"degenerate feature covariance (eigenvalues {vals}); features are redundant")
    return (vecs / np.sqrt(vals)).T, vals


def fit(comm, raw: np.ndarray, names: list[str], n_scales: int, keep_density: int | None = None) -> Orthogonaliser:
    """Build the orthogonaliser from this rank's raw feature rows (collective).

    ``names`` are the raw column names (``kind_R...``); the density block keeps
    min(``keep_density``, its size) eigenvectors (default n_scales + 1, the paper's), any other block
    keeps all of its columns.
    """
    mean, cov, _ = global_covariance(comm, raw)
    kinds = [name.split("_R")[0] for name in names]
    dens = [i for i, k in enumerate(kinds) if k in DENSITY_KINDS]
    other = [i for i, k in enumerate(kinds) if k not in DENSITY_KINDS]
    rows, vals = [], []
    keep_d = n_scales + 1 if keep_density is None else keep_density
    for cols, keep in ((dens, min(keep_d, len(dens))), (other, len(other))):
        if not cols:
            continue
        block, v = _block(cov, cols, keep)
        full = np.zeros((keep, len(names)))
        full[:, cols] = block
        rows.append(full)
        vals.append(v)
    return Orthogonaliser(np.vstack(rows), mean, np.concatenate(vals))
