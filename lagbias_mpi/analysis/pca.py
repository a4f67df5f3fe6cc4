"""Principal components of grad_theta f of a trained ensemble (paper section 4, eq. 4.1): sampling,
gradients, the moment matrix, binned means along a component and its peak.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from mpi4py import MPI

from lagbias_mpi.bias.ensemble import Ensemble
from lagbias_mpi.bias.orthogonalise import Orthogonaliser
from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.training.sampling import hash_uniform

SALT_PCA = 0x9CA


CHUNK = 1 << 16


def sample_mask(pid: np.ndarray, n_total: int, n_sample: int, seed: int) -> np.ndarray:
    """Particles kept for the PCA: hash(pid, seed) < n_sample / n_total (rank-independent)."""
    frac = min(float(n_sample) / max(int(n_total), 1), 1.0)
    return hash_uniform(pid, seed, 0, SALT_PCA) < frac


def _double_members(ens: Ensemble) -> list[torch.nn.Module]:
    return [copy.deepcopy(m).double().eval() for m in ens.members]


def grad_f(members: list[torch.nn.Module], theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f, grad_theta f) of the member-average f = <10^y_m> at each row of ``theta`` (float64)."""
    n, d = theta.shape
    f_out, g_out = np.empty(n), np.empty((n, d))
    for lo in range(0, n, CHUNK):
        x = torch.tensor(theta[lo:lo + CHUNK], dtype=torch.float64, requires_grad=True)
        f = torch.stack([torch.pow(10.0, m(x)) for m in members]).mean(dim=0)
        (g,) = torch.autograd.grad(f.sum(), x)
        f_out[lo:lo + CHUNK] = f.detach().numpy()
        g_out[lo:lo + CHUNK] = g.numpy()
    return f_out, g_out


def gradient_moment(comm, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Global M = sum grad grad^T, sum of grad and count: one Allreduce."""
    d = grads.shape[1]
    buf = np.concatenate([(grads.T @ grads).ravel(), grads.sum(axis=0), [len(grads)]])
    tot = global_sum(comm, buf)
    return tot[:d * d].reshape(d, d), tot[d * d:d * d + d], int(round(tot[-1]))


def principal_components(M: np.ndarray, grad_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors U (columns) of M, each column signed so that the
    mean directional derivative of f along it is >= 0 (else its largest component positive)."""
    vals, vecs = np.linalg.eigh(0.5 * (M + M.T))
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    for j in range(vecs.shape[1]):
        s = float(grad_sum @ vecs[:, j])
        if abs(s) < 1e-12 * (np.abs(grad_sum).sum() + 1e-300):
            s = vecs[np.argmax(np.abs(vecs[:, j])), j]
        if s < 0:
            vecs[:, j] *= -1
    return vals, vecs


def binned_mean(comm, x: np.ndarray, y: np.ndarray, n_bins: int = 30, min_count: int = 20):
    """Bin centres, mean y per bin (NaN below ``min_count`` entries) and counts over all ranks, with
    ``n_bins`` bins uniform between the global minimum and maximum of x (two reductions)."""
    lo = comm.allreduce(float(x.min()) if len(x) else np.inf, op=MPI.MIN)
    hi = comm.allreduce(float(x.max()) if len(x) else -np.inf, op=MPI.MAX)
    edges = np.linspace(lo, hi, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)
    buf = np.concatenate([np.bincount(idx, weights=y, minlength=n_bins),
                          np.bincount(idx, minlength=n_bins).astype(np.float64)])
    tot = global_sum(comm, buf)
    counts = tot[n_bins:]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts >= min_count, tot[:n_bins] / counts, np.nan)
    return 0.5 * (edges[1:] + edges[:-1]), mean, counts


def peak_of(centres: np.ndarray, mean: np.ndarray) -> float:
    """Centre of the bin with the largest (finite) mean."""
    if not np.isfinite(mean).any():
        return float("nan")
    return float(centres[np.nanargmax(mean)])


def pc_orthogonaliser(orth: Orthogonaliser, U: np.ndarray, eigenvalues: np.ndarray, k: int) -> Orthogonaliser:
    """The K leading PCs as an orthogonaliser of the standardised raw features."""
    return Orthogonaliser(U[:, :k].T @ orth.matrix, orth.mean, np.asarray(eigenvalues[:k], np.float64))


def analyse_sample(comm, ens: Ensemble, raw_sampled: np.ndarray) -> dict:
    """PCA of grad f on this rank's sampled particles (standardised raw features; collective)."""
    theta = ens.inputs(raw_sampled, standardised=True)
    f, g = grad_f(_double_members(ens), theta)
    M, gsum, count = gradient_moment(comm, g)
    vals, U = principal_components(M, gsum)
    pcs = theta @ U
    centres, mean_f, counts = binned_mean(comm, pcs[:, 0], f)
    return {"eigenvalues": vals, "U": U, "coefficients": U.T @ ens.orth.matrix, "n_sampled": count,
            "pc0_centres": centres, "pc0_mean_f": mean_f, "pc0_counts": counts,
            "pc0_peak": peak_of(centres, mean_f), "local_pcs": pcs, "local_f": f}
