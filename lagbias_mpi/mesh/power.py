"""Power and cross spectra of slab-decomposed fields.

The local Fourier slab's |delta_k|^2 are binned with ``np.bincount`` (weights 1 or 2 along the
half-complex axis) and the bins summed with one Allreduce, as nbodykit's ``project_to_basis``.
P(k) = V/N^6 <Re(a_k b_k^*)> for the unnormalised DFT, in (Mpc/h)^3.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.mpi.fft import SlabFFT

COMPENSATIONS = (None, "ngp", "cic")


def overdensity(comm, grid_slab: np.ndarray) -> np.ndarray:
    """delta = grid / <grid> - 1 with the global mean over all ranks."""
    n_cells = comm.allreduce(grid_slab.size)
    mean = float(global_sum(comm, grid_slab.sum(dtype=np.float64))) / n_cells
    if mean == 0:
        raise ValueError("overdensity of an empty field (mean 0)")
    return grid_slab / mean - 1.0


def default_edges(n: int, box: float, dk: float | None = None, kmax: float | None = None) -> np.ndarray:
    """Linear bin edges of width ``dk`` (default the fundamental k_f = 2 pi/box) centred on
    multiples of dk, starting at dk/2 (the k = 0 mode excluded), up to the Nyquist wavenumber."""
    kf = 2 * np.pi / box
    dk = kf if dk is None else dk
    kmax = np.pi * n / box if kmax is None else kmax
    return dk * (np.arange(int(np.floor(kmax / dk - 0.5)) + 1) + 0.5)


def _window(fft: SlabFFT, order: int) -> np.ndarray:
    """Assignment window |W(k)| = prod_i sinc(k_i cell / 2)^order on the local Fourier slab."""
    w = np.ones(fft.complex_shape)
    for k in fft.local_k(np.float64):
        w = w * np.sinc(k * fft.cell / (2 * np.pi)) ** order
    return w


def power_spectrum(fft: SlabFFT, field_a: np.ndarray, field_b: np.ndarray | None = None,
                   compensate: str | None = None, edges: np.ndarray | None = None) -> dict:
    """Auto (or cross, with ``field_b``) power spectrum of real-space overdensity slabs.

    ``compensate``: divide each field's modes by the NGP or CIC assignment window.
    Returns ``{"k": mean k per bin (h/Mpc), "power": P (Mpc/h)^3, "modes": mode count, "edges"}``.
    Bins with no mode have k and P = NaN. Collective.
    """
    if compensate not in COMPENSATIONS:
        raise ValueError(f"compensate must be one of {COMPENSATIONS}, got {compensate!r}")
    edges = default_edges(fft.n, fft.box) if edges is None else np.asarray(edges, dtype=np.float64)
    ak = fft.forward(field_a)
    bk = ak if field_b is None else fft.forward(field_b)
    prod = (ak.real.astype(np.float64) * bk.real + ak.imag.astype(np.float64) * bk.imag)
    if compensate is not None:
        prod = prod / _window(fft, 1 if compensate == "ngp" else 2) ** 2
    kmag = np.sqrt(fft.local_k2(np.float64))
    herm = np.broadcast_to(fft.hermitian_weights(), prod.shape)
    which = np.digitize(kmag, edges).ravel()  # 0: below the first edge; len(edges): above the last
    nb = len(edges) + 1
    w = herm.ravel()
    sums = np.stack([
        np.bincount(which, weights=w, minlength=nb),
        np.bincount(which, weights=w * kmag.ravel(), minlength=nb),
        np.bincount(which, weights=w * prod.ravel(), minlength=nb),
    ])[:, 1:-1]
    total = np.empty_like(sums)
    fft.comm.Allreduce(np.ascontiguousarray(sums), total, op=MPI.SUM)
    modes, ksum, psum = total
    norm = fft.box**3 / float(fft.n) ** 6
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.where(modes > 0, ksum / modes, np.nan)
        power = np.where(modes > 0, psum / modes * norm, np.nan)
    return {"k": k, "power": power, "modes": modes, "edges": edges}


def mode_weighted_ratio_below(k: np.ndarray, modes: np.ndarray, p_num: np.ndarray, p_den: np.ndarray,
                              kmax: float = 0.1) -> float:
    """sum_k N_k P_num(k) / sum_k N_k P_den(k) over the bins with 0 < k < ``kmax`` (N_k: modes per
    bin): the low-k ratio of the summed power rather than the mean of the bins' ratios."""
    sel = np.isfinite(p_num) & np.isfinite(p_den) & (k > 0) & (k < kmax)
    if not sel.any():
        raise ValueError(f"no k bin below {kmax} h/Mpc: the box is too small")
    return float(np.sum(modes[sel] * p_num[sel]) / np.sum(modes[sel] * p_den[sel]))


def mean_ratio_below(k: np.ndarray, ratio: np.ndarray, kmax: float = 0.1) -> float:
    """Mean of ``ratio`` over the bins with 0 < k < ``kmax`` (the papers' low-k figure of merit)."""
    sel = np.isfinite(ratio) & (k > 0) & (k < kmax)
    if not sel.any():
        raise ValueError(f"no k bin below {kmax} h/Mpc: the box is too small")
    return float(np.mean(ratio[sel]))
