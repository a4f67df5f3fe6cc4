"""Fourier-space loss (beyond the paper, ``train.kspace_loss``): the residual delta_model - delta_true
of the whole training grid, transformed with the distributed FFT, squared and cut at |k| <= k_cut.

The loss is linear in f through delta_model, so its parameter gradient is that of sum_i c_i f_i with
c_i = dL/d delta_model of particle i's cell times the cell's scale: one FFT pair gives dL/dr, then
the particles are pushed through the network in chunks (DDP synchronises on the last chunk only).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from . import ddp
from .fft import SlabFFT
from .model import f_of_y
from .parallel import global_sum
from .sampling import select_in_cells


@dataclass
class FieldSet:
    """This rank's slab of the whole training grid of one simulation, for the Fourier-space loss."""

    x: torch.Tensor  # (n_sel_local, n_in) inputs of all selected particles
    idx: np.ndarray  # (n_sel_local,) flat index of each particle's cell in the local slab
    scale: np.ndarray  # flat local slab: N_cells/N_part * n/n_sel, 0 in empty cells
    target: np.ndarray  # flat local slab: delta_true
    fft: SlabFFT
    cut: np.ndarray  # local Fourier slab: 1 where |k| <= k_cut, else 0


def build_field_set(comm, theta: np.ndarray, cell: np.ndarray, pid: np.ndarray, truth_slab: np.ndarray,
                    n_grid: int, box: float, n_part: int, frac: float, seed: int, member: int, k_cut: float,
                    dtype=torch.float32, device="cpu") -> FieldSet:
    """The particles selected as in :func:`build_batches` (same seed and member) with their local
    slab cell, and the Fourier cut ``|k| <= k_cut`` (h/Mpc) of the training grid (collective)."""
    fft = SlabFFT(comm, n_grid, box, np.float64)
    start = fft.real_start
    selected, cells, n, n_sel = select_in_cells(cell, pid, frac, seed, member)
    n_local = int(np.prod(fft.real_shape))
    scale = np.zeros(n_local)
    local_cells = np.asarray(cells, np.int64) - start * n_grid * n_grid
    scale[local_cells] = (n_grid**3 / n_part) * n / n_sel
    sel = np.nonzero(selected)[0]
    idx = np.asarray(cell[sel], np.int64) - start * n_grid * n_grid
    if len(idx) and (idx.min() < 0 or idx.max() >= n_local):
        raise ValueError("kspace loss: a selected particle's cell is not on this rank")
    cut = (fft.local_k2() <= k_cut**2).astype(np.float64)
    return FieldSet(torch.as_tensor(np.ascontiguousarray(theta[sel]), dtype=dtype, device=device), idx, scale,
                    np.asarray(truth_slab, np.float64).reshape(-1), fft, cut)


def kspace_loss_and_gradient(comm, fft: SlabFFT, cut: np.ndarray, residual: np.ndarray) -> tuple[float, np.ndarray]:
    """L = sum_k cut(k) |r_k|^2 / N^3 over all k (Hermitian weights on the half-complex slab) of the
    real residual slab r, and its gradient dL/dr = 2 IFFT[cut r_k] (a local real slab; collective)."""
    rk = fft.forward(np.asarray(residual, np.float64).reshape(fft.real_shape))
    local = float(np.sum(fft.hermitian_weights() * cut * (rk.real**2 + rk.imag**2)))
    loss = float(global_sum(comm, local)) / float(fft.n) ** 3
    return loss, 2.0 * fft.backward(cut * rk)


def _model_field(model, fs: FieldSet, chunk: int) -> np.ndarray:
    """Flat local slab of delta_model (no gradient): scale * sum of f in the cell - 1."""
    cellsum = np.zeros(len(fs.scale))
    with torch.no_grad():
        for lo in range(0, len(fs.idx), chunk):
            f = f_of_y(model(fs.x[lo:lo + chunk])).double().cpu().numpy().reshape(-1)
            np.add.at(cellsum, fs.idx[lo:lo + chunk], f)
    return fs.scale * cellsum - 1.0


def kspace_step(comm, dmodel, field_sets: list[FieldSet], weight: float, chunk: int) -> float:
    """Back-propagate weight * (sum over simulations of the Fourier-space loss) into the gradients
    of ``dmodel`` (collective); returns the loss. The loss is linear in f through delta_model, so its
    gradient is that of sum_i c_i f_i with c_i = weight * scale_j dL/dr_j of the particle's cell j,
    accumulated over chunks of particles (DDP synchronises on the last chunk only)."""
    total, coeffs = 0.0, []
    for fs in field_sets:
        r = _model_field(ddp.unwrap(dmodel), fs, chunk) - fs.target
        loss, grad = kspace_loss_and_gradient(comm, fs.fft, fs.cut, r)
        total += weight * loss
        coeffs.append(weight * comm.size * (fs.scale * grad.reshape(-1))[fs.idx])
    pieces = [(fs, c, lo) for fs, c in zip(field_sets, coeffs) for lo in range(0, len(fs.idx), chunk)]
    if not pieces:
        pieces = [(field_sets[0], coeffs[0], 0)]
    for i, (fs, c, lo) in enumerate(pieces):
        last = i == len(pieces) - 1
        ctx = contextlib.nullcontext() if last or not hasattr(dmodel, "no_sync") else dmodel.no_sync()
        with ctx:
            f = f_of_y(dmodel(fs.x[lo:lo + chunk])).reshape(-1)
            cc = torch.as_tensor(c[lo:lo + chunk], dtype=f.dtype, device=f.device)
            (cc * f).sum().backward()
    return total

