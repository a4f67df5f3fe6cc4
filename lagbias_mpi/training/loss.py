"""The training objective of one batch (paper eq. 2.5 grid term, non-negativity guard, integral
constraint) and its reductions over ranks.

The integral constraint is on the mean f of all particles of the training simulation(s):

    C = ((S_others + S_batch - T) / N)^2 / eps^2,

S_batch = sum_i w_i f_i over the batch (w_i = n_j / n_sel_j), S_others the latest S of every other
batch (a running sum, :class:`RunningSum`: one number per batch, updated after each step), T = the
true field's sum over all cells (N_part / N_cells sum_j (1 + delta_true[j])) and N = sum_j n_j. The
true field meets it exactly; it does not ask every batch of a few thousand cells to hold its own
spiky sum to eps (which no model short of the truth can, and which flattened f at eps = 1e-4).
Only S_batch carries a gradient. ``others=None`` constrains the batch alone (S_others = 0, T and N
of the batch).

The grid term per cell (``train.grid_loss``), with m = 1 + delta_model and t = 1 + delta_true:

- ``mse``: (m - t)^2, the paper's eq. 2.5. Its gradient on a particle's y = log10 f is
  2 (m - t) scale ln(10) f_i: dominated by the densest cells, and vanishing for particles whose f
  has fallen far below the truth (measured on planted truths: the lower three quartiles of f_true
  ended 4-100x too low while the cell sums fitted to 1%, docs/results.md).
- ``poisson``: the Poisson deviance 2 (t ln(t/m) - (t - m)) (0 at m = t). Its gradient 2 (1 - t/m)
  scale ln(10) f_i is relative: a cell whose model sum is too low by a factor pulls its particles up
  with a force of order t / n_cell, whatever f_i is. As a quasi-likelihood its estimating equation
  sum_j (1 - t_j / m_j) dm_j = 0 is unbiased for any noise of the true field (halos are not
  Poisson), and with the output bias as the log-link's intercept it holds sum_j m_j = sum_j t_j at
  its minimum: the integral constraint is its own stationarity condition.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from lagbias_mpi.bias.model import f_of_y
from lagbias_mpi.training.batches import Batch, BatchSet


GRID_LOSSES = ("mse", "poisson")


def grid_per_cell(m: torch.Tensor, t: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The grid term of each cell for model m = 1 + delta_model > 0 and truth t = 1 + delta_true >= 0
    (module docstring): ``mse`` (m - t)^2, ``poisson`` 2 (t ln(t/m) - (t - m))."""
    if kind == "mse":
        return (m - t) ** 2
    if kind == "poisson":
        return 2.0 * (torch.xlogy(t, t) - torch.xlogy(t, m) - t + m)
    raise ValueError(f"grid_loss must be one of {GRID_LOSSES}, got {kind!r}")


def grid_slope(m: torch.Tensor, t: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """d(:func:`grid_per_cell`)/dm of each cell."""
    if kind == "mse":
        return 2.0 * (m - t)
    if kind == "poisson":
        return 2.0 * (1.0 - t / m)
    raise ValueError(f"grid_loss must be one of {GRID_LOSSES}, got {kind!r}")


def batch_terms(model, batch: Batch, guard_y: float, grid_loss: str = "mse"):
    """Local (grid term, guard term, S_local = sum_i w_i f_i) tensors of one batch (w_i = n_j /
    n_sel_j of the particle's cell)."""
    grid, guard, s_local, _ = _terms_and_f(model, batch, guard_y, grid_loss=grid_loss)
    return grid, guard, s_local


def cell_sums(batch: Batch, f: torch.Tensor) -> torch.Tensor:
    """(n_cells_b,) sum of the selected particles' f in each of the batch's cells on this rank."""
    return torch.zeros(batch.scale.shape, dtype=f.dtype, device=f.device).index_add_(0, batch.idx, f)


def _forward(model, batch: Batch, guard_y: float):
    """(f, cell sums of f, S_local = sum_i w_i f_i, guard term) of one batch on this rank."""
    y = model(batch.x)
    f = f_of_y(y)
    cellsum = cell_sums(batch, f)
    guard = (torch.clamp(y - guard_y, max=0.0) ** 4).sum()
    return f, cellsum, (batch.weight * cellsum).sum(), guard


def model_cells(batch: Batch, cellsum: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """m = 1 + delta_model of the batch's cells for f scaled by ``c``: c scale_j sum_{i in j} f_i."""
    return batch.scale * cellsum * c


def projection_scale(true_sum: float, s_glob: float) -> float:
    """c = T / S, the factor that gives f the true field's sum (1 when S is not positive and finite)."""
    return true_sum / s_glob if s_glob > 0 and np.isfinite(s_glob) else 1.0


def through_scale(dgdc: float, c: float, s_glob: float) -> float:
    """K = -(dL/dc) c / S: the coefficient of the surrogate K S_local whose gradient is the grid
    term's part through c = T / S (dc/dS = -c/S); 0 when S is not positive and finite."""
    return -dgdc * c / s_glob if s_glob > 0 and np.isfinite(s_glob) else 0.0


def scaled_terms(model, batch: Batch, guard_y: float, c: float = 1.0, grid_loss: str = "mse"):
    """Local (grid term of f scaled by the constant ``c``, guard term, S_local = sum_i w_i f_i, cell
    sums of f, f) of one batch (the full-batch phase, :mod:`lagbias_mpi.training.polish`)."""
    f, cellsum, s_local, guard = _forward(model, batch, guard_y)
    grid = grid_per_cell(model_cells(batch, cellsum, c), 1.0 + batch.target, grid_loss).sum()
    return grid, guard, s_local, cellsum, f


def _terms_and_f(model, batch: Batch, guard_y: float, comm=None, grid_loss: str = "mse"):
    """:func:`batch_terms` plus the tensor of f (for the Fourier-space loss's surrogate). With
    ``comm`` the grid term is the projected one (:func:`projected_grid`, collective): its value that
    of f scaled to the batch's true sum, its gradient including the part through the scale."""
    f, cellsum, s_local, guard = _forward(model, batch, guard_y)
    if comm is None:
        grid = grid_per_cell(model_cells(batch, cellsum), 1.0 + batch.target, grid_loss).sum()
    else:
        grid, through_c = projected_grid(comm, batch, cellsum, s_local, grid_loss)
        grid = grid + (through_c - through_c.detach())  # the value of the grid term, the gradient of both
    return grid, guard, s_local, f


def projected_grid(comm, batch: Batch, cellsum: torch.Tensor, s_local: torch.Tensor, grid_loss: str = "mse"):
    """The grid term of the batch's f scaled by c = T / S (S = sum_i w_i f_i over the whole batch,
    all ranks; T the true field's sum): the term sees the shape of f, never its normalisation, and
    the batch's sum is the true field's by construction. Returns (grid value with c held fixed,
    surrogate K S_local whose gradient is the part through c): with dc/dS = -c/S and
    K = -(c/S) sum_j g'(m_j) scale_j cellsum_j over all ranks (g' = :func:`grid_slope`), the
    gradients summed over ranks equal the one-rank gradient of the whole batch (two scalar Allreduces)."""
    s_glob = comm.allreduce(float(s_local.detach()), op=MPI.SUM)
    if not batch.true_sum > 0:
        # no true mass in the batch (sparse targets: thin mass ranges): f scaled to a zero sum is
        # zero everywhere and meets the truth exactly, so the term and its gradient are zero (the
        # formulas below would give 0/0 in every cell)
        zero = (0.0 * cellsum).sum()
        return zero, 0.0 * s_local
    c = projection_scale(batch.true_sum, s_glob)
    m, t = model_cells(batch, cellsum, c), 1.0 + batch.target
    slope = grid_slope(m.detach(), t, grid_loss)
    dgdc = comm.allreduce(float((slope * batch.scale * cellsum.detach()).sum()), op=MPI.SUM)
    return grid_per_cell(m, t, grid_loss).sum(), through_scale(dgdc, c, s_glob) * s_local


def reduce_terms(comm, grid, guard, s_local, stop: bool = False) -> np.ndarray:
    """Global (grid, guard, S, number of ranks that want to stop) of a batch: one Allreduce of four
    float64 (the stop wish of :class:`~lagbias_mpi.training.stopping.StopControl` rides along)."""
    local = np.array([float(grid), float(guard), float(s_local), float(stop)], dtype=np.float64)
    out = np.empty(4)
    comm.Allreduce(local, out, op=MPI.SUM)
    return out


@dataclass
class RunningSum:
    """The latest global S = sum_i w_i f_i of every batch of a :class:`BatchSet` (float64), with the
    true field's total T and the particle total N of the set."""

    s_last: np.ndarray
    t_total: float
    n_total: int

    @classmethod
    def start(cls, batches: BatchSet) -> "RunningSum":
        """S of f = 1 (the zero-initialised network): S_b = N_b."""
        return cls(np.array([b.n_all for b in batches.batches], np.float64),
                   float(sum(b.true_sum for b in batches.batches)), int(sum(b.n_all for b in batches.batches)))

    def others(self, b: int) -> tuple[float, float, int]:
        """(S of the batches other than ``b``, T, N): the ``others`` of :func:`local_objective`."""
        return float(self.s_last.sum() - self.s_last[b]), self.t_total, self.n_total


def output_bias(model) -> torch.Tensor:
    """The bias of the network's output layer, y = ... + b (through a DDP wrapper)."""
    return getattr(model, "module", model).net[-1].bias


def renormalise(comm, model, batches: BatchSet, guard_y: float, running: "RunningSum") -> float:
    """Shift the output bias so that the weighted sum of f over ``batches`` equals the true field's
    (mean f = T / N over all their particles, exactly), and refresh ``running`` to the new sums
    (collective, no gradient). Returns the factor f was multiplied by."""
    sums = np.zeros(len(batches.batches))
    with torch.no_grad():
        for b, batch in enumerate(batches.batches):
            sums[b] = reduce_terms(comm, 0.0, 0.0, batch_terms(model, batch, guard_y)[2])[2]
        total = float(sums.sum())
        if not (total > 0 and np.isfinite(total)) or running.t_total <= 0:
            return 1.0
        factor = running.t_total / total
        output_bias(model).add_(float(np.log10(factor)))
    running.s_last = sums * factor
    return factor


def normalise_step(model, running: "RunningSum", b: int, s_batch: float) -> float:
    """The constraint by construction, after an optimiser step on batch ``b`` whose global weighted
    sum of f was ``s_batch``: the output bias is shifted so that the running sum over all batches
    equals the true field's T, and every batch's running sum is scaled with it (the shift multiplies
    every f by the same factor). No communication: the sums are global already. Returns the factor."""
    running.s_last[b] = s_batch
    total = float(running.s_last.sum())
    if not (total > 0 and np.isfinite(total)) or running.t_total <= 0:
        return 1.0
    factor = running.t_total / total
    with torch.no_grad():
        output_bias(model).add_(float(np.log10(factor)))
    running.s_last *= factor
    return factor


def _constraint_parts(batch: Batch, others) -> tuple[float, float, int]:
    return (0.0, batch.true_sum, batch.n_all) if others is None else others


def constraint_residual(s_global: float, batch: Batch, others=None) -> float:
    """(S_others + S - T) / N: the weighted sum of f minus the true field's, per particle."""
    s_o, t, n = _constraint_parts(batch, others)
    return (s_o + s_global - t) / n if n > 0 else 0.0


def whole_loss(totals: np.ndarray, batch: Batch, eps: float | None, others=None) -> float:
    """Whole-batch loss value from the reduced terms."""
    loss = totals[0] + totals[1]
    if eps is not None:
        loss += constraint_residual(totals[2], batch, others) ** 2 / eps**2
    return float(loss)


CONSTRAINT_MODES = ("penalty", "held", "projection")


def local_objective(comm, model, batch: Batch, eps: float | None, guard_y: float,
                    kspace_coef: torch.Tensor | None = None, stop: bool = False, others=None,
                    constraint: str = "penalty", grid_loss: str = "mse"):
    """(tensor to back-propagate on this rank, whole-batch loss value, global S = sum_i w_i f_i,
    whether any rank wants to stop after this step).

    ``kspace_coef``: the Fourier-space loss's c_i of the batch's particles (:mod:`lagbias_mpi.training.kspace`),
    whose surrogate sum_i c_i f_i joins the objective (not the reported loss). ``stop``: this rank's
    wish to stop after the step, reduced with the loss terms. ``others``: (S of the other batches, T,
    N) of the constraint (:meth:`RunningSum.others`), None for the batch alone. ``constraint``:
    ``penalty`` (back-propagated as below), ``held`` (the penalty enters the loss value only: the
    constraint is held by :func:`normalise_step`) or ``projection`` (the grid term of f scaled to
    the batch's true sum, :func:`projected_grid`; no penalty). ``grid_loss``: :func:`grid_per_cell`.

    The constraint's gradient reaches only the output bias (f -> f 10^db, the one direction that
    changes the normalisation and not the shape of f): measured, letting it reach every weight at
    eps = 1e-4 turned the network flat on planted truths (f = 1 meets the constraint best)."""
    if constraint not in CONSTRAINT_MODES:
        raise ValueError(f"constraint must be one of {CONSTRAINT_MODES}, got {constraint!r}")
    project = constraint == "projection"
    grid, guard, s_local, f = _terms_and_f(model, batch, guard_y, comm if project else None, grid_loss)
    totals = reduce_terms(comm, grid.detach(), guard.detach(), s_local.detach(), stop)
    obj = grid + guard
    if kspace_coef is not None:
        obj = obj + (kspace_coef * f).sum()
    n = _constraint_parts(batch, others)[2]
    if eps is not None and n > 0 and constraint == "penalty":
        bias = output_bias(model)
        s_norm = s_local.detach() * torch.pow(10.0, bias - bias.detach()).sum()  # value S_local, d/d(bias) only
        obj = obj + (2.0 * constraint_residual(totals[2], batch, others) / (eps**2 * n)) * s_norm
    reported_eps = None if project else eps  # projection: the constraint holds by construction
    return obj * comm.size, whole_loss(totals, batch, reported_eps, others), float(totals[2]), bool(totals[3] > 0)


@dataclass(frozen=True)
class SetStatistics:
    """The projected objective of a whole batch set: c = T / S, the surrogate coefficient K of the part
    through c, the grid and guard terms of f scaled by c (summed over the set), S = sum_i w_i f_i."""

    c: float
    k: float
    grid: float
    guard: float
    s: float


def set_statistics(comm, model, batches: BatchSet, guard_y: float, grid_loss: str) -> SetStatistics:
    """:class:`SetStatistics` of ``batches`` for the current model: one forward pass without
    gradient, two small Allreduces (collective). The full-batch phase's objective
    (:mod:`lagbias_mpi.training.polish`) and the validation loss under ``constraint: projection``."""
    cellsums, s_local, guard = [], 0.0, 0.0
    with torch.no_grad():
        for batch in batches.batches:
            _, g, s, cs, _ = scaled_terms(model, batch, guard_y, 1.0, grid_loss)
            cellsums.append(cs)
            s_local += float(s)
            guard += float(g)
    s_glob = comm.allreduce(s_local, op=MPI.SUM)
    t_glob = float(sum(b.true_sum for b in batches.batches))
    c = projection_scale(t_glob, s_glob)
    grid, dgdc = 0.0, 0.0
    with torch.no_grad():
        for batch, cs in zip(batches.batches, cellsums):
            m, t = model_cells(batch, cs, c), 1.0 + batch.target
            grid += float(grid_per_cell(m, t, grid_loss).to(torch.float64).sum())
            dgdc += float((grid_slope(m, t, grid_loss) * batch.scale * cs).to(torch.float64).sum())
    grid, guard, dgdc = comm.allreduce(np.array([grid, guard, dgdc]), op=MPI.SUM)
    return SetStatistics(c, through_scale(dgdc, c, s_glob), float(grid), float(guard), float(s_glob))


def evaluate_loss(comm, model, batches: BatchSet, eps: float | None, guard_y: float,
                  grid_loss: str = "mse", projection: bool = False) -> tuple[float, float]:
    """(loss, weighted mean f of all the set's cells' particles, sum_i w_i f_i / sum_j n_j), no gradient.

    The loss is the mean over ``batches`` of the grid and guard terms plus the integral constraint
    of the whole set; with ``projection`` (``train.constraint: projection``) the grid term is that of
    f scaled to the set's true sum (:func:`set_statistics`, summed over the set and divided by the
    number of batches), without a constraint term: as in training, the loss sees the shape of f, and
    its normalisation is the mean f. On another box than the training box the true field's own mean
    differs from the training box's (cosmic variance, a few per cent on the built-in box), which
    the constraint term with the paper's eps would turn into a loss of 1e4."""
    if projection:
        st = set_statistics(comm, model, batches, guard_y, grid_loss)
        return (st.grid + st.guard) / max(len(batches.batches), 1), st.s / max(batches.n_particles, 1)
    losses, s_tot = [], 0.0
    with torch.no_grad():
        for batch in batches.batches:
            grid, guard, s_local = batch_terms(model, batch, guard_y, grid_loss)
            totals = reduce_terms(comm, grid, guard, s_local)
            losses.append(totals[0] + totals[1])
            s_tot += totals[2]
    run = RunningSum.start(batches)
    loss = float(np.mean(losses))
    if eps is not None and run.n_total > 0:
        loss += ((s_tot - run.t_total) / run.n_total) ** 2 / eps**2
    return loss, s_tot / max(batches.n_particles, 1)
