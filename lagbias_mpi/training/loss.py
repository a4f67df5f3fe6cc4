"""The training objective of one batch (paper eq. 2.5 grid term, non-negativity guard, integral constraint) and its reductions over ranks.
"""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from lagbias_mpi.bias.model import f_of_y
from lagbias_mpi.training.batches import Batch, BatchSet


def batch_terms(model, batch: Batch, guard_y: float):
    """Local (grid term, guard term, S_local = sum_i w_i f_i) tensors of one batch (w_i = n_j /
    n_sel_j of the particle's cell)."""
    return _terms_and_f(model, batch, guard_y)[:3]


def _terms_and_f(model, batch: Batch, guard_y: float):
    """:func:`batch_terms` plus the tensor of f (for the Fourier-space loss's surrogate)."""
    y = model(batch.x)
    f = f_of_y(y)
    cellsum = torch.zeros(batch.scale.shape, dtype=f.dtype, device=f.device).index_add_(0, batch.idx, f)
    grid = ((batch.scale * cellsum - 1.0 - batch.target) ** 2).sum()
    guard = (torch.clamp(y - guard_y, max=0.0) ** 4).sum()
    return grid, guard, (batch.weight * cellsum).sum(), f


def reduce_terms(comm, grid, guard, s_local, stop: bool = False) -> np.ndarray:
    """Global (grid, guard, S, number of ranks that want to stop) of a batch: one Allreduce of four
    float64 (the stop wish of :class:`~lagbias_mpi.training.stopping.StopControl` rides along)."""
    local = np.array([float(grid), float(guard), float(s_local), float(stop)], dtype=np.float64)
    out = np.empty(4)
    comm.Allreduce(local, out, op=MPI.SUM)
    return out


def constraint_residual(s_global: float, batch: Batch) -> float:
    """(S - T) / N of a batch: its weighted sum of f minus the true field's, per particle."""
    return (s_global - batch.true_sum) / batch.n_all if batch.n_all > 0 else 0.0


def whole_loss(totals: np.ndarray, batch: Batch, eps: float | None) -> float:
    """Whole-batch loss value from the reduced terms."""
    loss = totals[0] + totals[1]
    if eps is not None and batch.n_all > 0:
        loss += constraint_residual(totals[2], batch) ** 2 / eps**2
    return float(loss)


def local_objective(comm, model, batch: Batch, eps: float | None, guard_y: float,
                    kspace_coef: torch.Tensor | None = None, stop: bool = False):
    """(tensor to back-propagate on this rank, whole-batch loss value, global S = sum_i w_i f_i,
    whether any rank wants to stop after this step).

    ``kspace_coef``: the Fourier-space loss's c_i of the batch's particles (:mod:`lagbias_mpi.training.kspace`),
    whose surrogate sum_i c_i f_i joins the objective (not the reported loss). ``stop``: this rank's
    wish to stop after the step, reduced with the loss terms."""
    grid, guard, s_local, f = _terms_and_f(model, batch, guard_y)
    totals = reduce_terms(comm, grid.detach(), guard.detach(), s_local.detach(), stop)
    obj = grid + guard
    if kspace_coef is not None:
        obj = obj + (kspace_coef * f).sum()
    if eps is not None and batch.n_all > 0:
        obj = obj + (2.0 * constraint_residual(totals[2], batch) / (eps**2 * batch.n_all)) * s_local
    return obj * comm.size, whole_loss(totals, batch, eps), float(totals[2]), bool(totals[3] > 0)


def evaluate_loss(comm, model, batches: BatchSet, eps: float | None, guard_y: float) -> tuple[float, float]:
    """Mean whole-batch loss over ``batches`` and the weighted mean f of all their cells' particles,
    sum_i w_i f_i / sum_j n_j (no gradient)."""
    losses, s_tot = [], 0.0
    with torch.no_grad():
        for batch in batches.batches:
            grid, guard, s_local = batch_terms(model, batch, guard_y)
            totals = reduce_terms(comm, grid, guard, s_local)
            losses.append(whole_loss(totals, batch, eps))
            s_tot += totals[2]
    return float(np.mean(losses)), s_tot / max(batches.n_particles, 1)
