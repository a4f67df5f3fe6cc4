"""Fourier-space loss (beyond the paper, ``train.kspace_loss``): the residual r = delta_model -
delta_true of the whole training grid, transformed with the distributed FFT and cut at |k| <= k_cut,

    L_k = weight * sum_{|k| <= k_cut} |r_k|^2 / n_cut      (n_cut: modes inside the cut),

which is sum_j r_j^2 (the real-space loss of all cells, Parseval) without a cut: weight 1 gives the
cut modes' mean residual power the weight the real-space loss gives the mean of all modes.

L_k is linear in f through delta_model, so its parameter gradient is that of sum_i c_i f_i over the
selected particles with c_i = dL_k/d delta_model of particle i's cell times the cell's scale. Every
``refresh_steps`` batch steps the field is painted from all selected particles with the current
model (no autograd) and one FFT pair gives dL_k/dr and thus c_i; every batch step adds
sum_{i in batch} c_i f_i to its objective, so that over an epoch the batches carry the whole
gradient of L_k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lagbias_mpi.bias.model import f_of_y
from lagbias_mpi.mpi.cells import CellOwnership
from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.mpi.exchange import redistribute_ranges
from lagbias_mpi.mpi.fft import SlabFFT
from lagbias_mpi.training.sampling import cell_scale, select_in_cells


@dataclass
class FieldSet:
    """The cells this rank owns of the whole training grid of one simulation, for the Fourier-space
    loss; the FFT works on plane slabs, reached by redistributing the owned range."""

    x: torch.Tensor  # (n_sel_local, n_in) inputs of all selected particles
    sel: np.ndarray  # (n_sel_local,) their indices among the rank's particles of the simulation
    n_particles_local: int  # the rank's particles of the simulation
    idx: np.ndarray  # (n_sel_local,) index of each particle's cell in the owned range
    scale: np.ndarray  # owned range: N_cells/N_part * n/n_sel, 0 in empty cells
    target: np.ndarray  # owned range: delta_true
    fft: SlabFFT
    cut: np.ndarray  # local Fourier slab: 1 where |k| <= k_cut, else 0
    ownership: CellOwnership
    slab_edges: np.ndarray  # flat-cell edges of every rank's real FFT slab


def build_field_set(comm, theta: np.ndarray, cell: np.ndarray, pid: np.ndarray, truth: np.ndarray,
                    n_grid: int, box: float, n_part: int, frac: float, seed: int, member: int, k_cut: float,
                    dtype=torch.float32, device="cpu", ownership: CellOwnership | None = None) -> FieldSet:
    """The particles selected as in :func:`build_batches` (same seed and member) with their owned
    cell, and the Fourier cut ``|k| <= k_cut`` (h/Mpc) of the training grid (collective).
    ``truth``: delta_true at the cells this rank owns under ``ownership`` (default: the plane slabs)."""
    own = ownership if ownership is not None else CellOwnership.by_planes(n_grid, comm.size)
    fft = SlabFFT(comm, n_grid, box, np.float64)
    lo, hi = own.bounds(comm.rank)
    selected, cells, n, n_sel = select_in_cells(cell, pid, frac, seed, member)
    scale = np.zeros(hi - lo)
    scale[np.asarray(cells, np.int64) - lo] = cell_scale(n, n_sel, n_grid**3, n_part)
    sel = np.nonzero(selected)[0]
    idx = np.asarray(cell[sel], np.int64) - lo
    if len(idx) and (idx.min() < 0 or idx.max() >= hi - lo):
        raise ValueError("kspace loss: a selected particle's cell is not on this rank")
    target = np.asarray(truth, np.float64).reshape(-1)
    if len(target) != hi - lo:
        raise ValueError(f"kspace loss: {len(target)} true values for the {hi - lo} owned cells")
    cut = (fft.local_k2() <= k_cut**2).astype(np.float64)
    return FieldSet(torch.as_tensor(np.ascontiguousarray(theta[sel]), dtype=dtype, device=device), sel, len(cell),
                    idx, scale, target, fft, cut, own, _slab_edges(comm, fft))


def _slab_edges(comm, fft: SlabFFT) -> np.ndarray:
    starts = comm.allgather(int(fft.real_start) * fft.n * fft.n)
    return np.array([*starts, fft.n**3], np.int64)


def kspace_loss_and_gradient(comm, fft: SlabFFT, cut: np.ndarray, residual: np.ndarray) -> tuple[float, np.ndarray]:
    """L = sum_k cut(k) |r_k|^2 / n_cut over all k (Hermitian weights on the half-complex slab; n_cut
    = sum_k cut(k)) of the real residual slab r, and its gradient dL/dr = 2 (N^3 / n_cut) IFFT[cut r_k]
    (a local real slab; collective). Without a cut, L = sum_j r_j^2."""
    rk = fft.forward(np.asarray(residual, np.float64).reshape(fft.real_shape))
    weights = fft.hermitian_weights() * cut
    local = np.array([np.sum(weights * (rk.real**2 + rk.imag**2)), np.sum(weights)])
    power, n_cut = global_sum(comm, local)
    if n_cut <= 0:
        raise ValueError("kspace loss: no Fourier mode inside k_cut")
    return float(power / n_cut), (2.0 * float(fft.n) ** 3 / n_cut) * fft.backward(cut * rk)


def _cell_sums(model, fs: FieldSet, chunk: int) -> np.ndarray:
    """Flat local slab of sum_{i in j} f_i over the selected particles of each owned cell (no gradient)."""
    cellsum = np.zeros(len(fs.scale))
    with torch.no_grad():
        for lo in range(0, len(fs.idx), chunk):
            f = f_of_y(model(fs.x[lo:lo + chunk])).double().cpu().numpy().reshape(-1)
            np.add.at(cellsum, fs.idx[lo:lo + chunk], f)
    return cellsum


@dataclass(frozen=True)
class KSpaceTerms:
    """weight * L_k of f scaled by c, its per-particle coefficients and its derivative in c."""

    loss: float
    coef: np.ndarray  # (n_particles_local,) weight c scale_j dL_k/dr_j of each particle's cell (0: not selected)
    dloss_dc: float  # global weight sum_j dL_k/dr_j scale_j sum_{i in j} f_i


def kspace_terms(comm, model, fs: FieldSet, weight: float, chunk: int, c: float = 1.0) -> KSpaceTerms:
    """:class:`KSpaceTerms` of the model field delta_model = c scale_j sum_{i in j} f_i - 1 (collective,
    no autograd). With c held fixed, sum_i coef_i df_i/dtheta is the parameter gradient of
    weight * L_k; the full-batch phase (:mod:`lagbias_mpi.training.polish`) adds the part through
    its c = T / S from ``dloss_dc``."""
    cellsum = _cell_sums(model, fs, chunk)
    r = redistribute_ranges(comm, c * fs.scale * cellsum - 1.0 - fs.target, fs.ownership.edges, fs.slab_edges)
    loss, grad = kspace_loss_and_gradient(comm, fs.fft, fs.cut, r)
    grad = redistribute_ranges(comm, grad, fs.slab_edges, fs.ownership.edges)
    coef = np.zeros(fs.n_particles_local)
    coef[fs.sel] = weight * c * (fs.scale * grad)[fs.idx]
    dloss_dc = float(global_sum(comm, np.float64(weight * np.sum(grad * fs.scale * cellsum))))
    return KSpaceTerms(weight * loss, coef, dloss_dc)


def kspace_coefficients(comm, model, fs: FieldSet, weight: float, chunk: int) -> tuple[float, np.ndarray]:
    """(weight * L_k of the current model, c) with c_i = weight * scale_j dL_k/dr_j for each of the
    rank's particles of the simulation (0 for those not selected): sum_i c_i df_i/dtheta is the
    parameter gradient of weight * L_k (collective, no autograd; the epochs' coefficients)."""
    terms = kspace_terms(comm, model, fs, weight, chunk)
    return terms.loss, terms.coef
