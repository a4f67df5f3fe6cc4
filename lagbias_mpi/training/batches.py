"""The batches of one ensemble member: per-cell sub-samples split into batches of whole cells.

Loss of a batch (a fixed set of cells, DESIGN.md section 1), sums over the whole batch (all ranks):

    L = sum_j (delta_model[j] - delta_true[j])^2 + sum_i (y_i - y_g)^4 [y_i < y_g] + C

with 1 + delta_model[j] = scale_j sum_{selected i in j} f_i, scale_j = (N_cells / N_part) n_j / n_sel_j
(``sampling.cell_scale``), and C the integral constraint on the weighted sum S = sum_i w_i f_i,
w_i = n_j / n_sel_j (the same per-cell weights), against the true field's sum T, per particle of
all cells N = sum_j n_j (:mod:`lagbias_mpi.training.loss`). Each batch carries its n_all (= its N)
and true_sum (= its T). A cell and its particles live on one rank, so the first two terms are local
sums; DDP averages gradients over the P ranks, so each rank back-propagates P times its local part,
the constraint through a surrogate linear in S_local: the summed gradients equal the gradient of the
whole-batch loss on one rank.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lagbias_mpi.core.memory import ROWS_PER_STEP
from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.training.sampling import (
    batch_of_cells,
    cell_scale,
    cell_weight,
    n_batches_for,
    select_in_cells,
    sorted_by_cell_and_id,
)


@dataclass
class Batch:
    """This rank's part of one global batch. The inputs are not copied: ``x`` gathers the rows
    ``pidx`` of the simulation's theta when asked (once per step), and ``idx`` (the batch-local
    cell of each selected particle) is found from ``pidx`` and the first row of each of the batch's
    cells when the rank's rows are grouped by cell (the Eulerian routing's layout), so a batch
    costs 4 B per selected particle (``pidx``, int32) instead of 4 n_in + 16; other layouts store
    ``idx`` (4 B more)."""

    theta: np.ndarray  # (n_particles_local, n_in) float32: the rank's inputs of the simulation (shared)
    scale: torch.Tensor  # (n_cells_b,) N_cells/N_part * n/n_sel
    weight: torch.Tensor  # (n_cells_b,) n/n_sel: the particles each selected particle stands for
    target: torch.Tensor  # (n_cells_b,) delta_true
    n_global: int  # selected particles of the batch over all ranks
    n_all: int  # N: all particles of the batch's cells over all ranks (sum of n)
    true_sum: float  # T: (N_part / N_cells) sum_j (1 + delta_true[j]) over the batch's cells, all ranks
    pidx: np.ndarray  # (n_b,) indices of the particles among the rank's particles of the simulation
    box: int = 0  # which training simulation (for the Fourier-space loss's coefficients)
    cell_rows: np.ndarray | None = None  # (n_cells_b,) increasing first row of each cell (grouped rows)
    stored_idx: torch.Tensor | None = None  # (n_b,) int32 batch-local cell (rows not grouped by cell)

    def __post_init__(self):
        if (self.cell_rows is None) == (self.stored_idx is None):
            raise ValueError("a Batch needs exactly one of cell_rows (rows grouped by cell) and stored_idx")

    @property
    def idx(self) -> torch.Tensor:
        """(n_b,) batch-local cell of each selected particle (int64 when computed per step)."""
        if self.stored_idx is not None:
            return self.stored_idx
        local = np.searchsorted(self.cell_rows, self.pidx, side="right") - 1
        return torch.as_tensor(local, device=self.scale.device)

    @property
    def x(self) -> torch.Tensor:
        """(n_b, n_in) inputs of the selected particles, gathered from theta (a new tensor)."""
        return torch.as_tensor(self.theta[self.pidx], device=self.scale.device).to(self.scale.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def nbytes(self) -> int:
        """Bytes this batch holds (theta is shared, not counted)."""
        held = [self.scale, self.weight, self.target] + ([self.stored_idx] if self.stored_idx is not None else [])
        rows = self.cell_rows.nbytes if self.cell_rows is not None else 0
        return self.pidx.nbytes + rows + sum(t.element_size() * t.nelement() for t in held)


@dataclass
class BatchSet:
    batches: list[Batch]
    n_selected: int  # global
    n_cells_local: int
    n_particles: int = 0  # global: all particles of the cells of the batches (sum of the batches' n_all)

    def __len__(self):
        return len(self.batches)


def build_batches(comm, theta: np.ndarray, cell: np.ndarray, pid: np.ndarray, target_of_cells,
                  n_cells_total: int, n_part: int, frac: float, batch_size: int, seed: int, member: int,
                  dtype=torch.float32, device="cpu", box: int = 0) -> BatchSet:
    """Sub-sample the particles per cell and split the cells into batches (collective).

    ``target_of_cells(cells) -> delta_true`` of local cells; ``n_cells_total`` and ``n_part`` are the
    global numbers of grid cells and particles of the simulation; ``box`` numbers the simulation.
    """
    selected, cells, n, n_sel = select_in_cells(cell, pid, frac, seed, member)
    total = int(global_sum(comm, np.int64(n_sel.sum())))
    nb = n_batches_for(total, batch_size)
    bcell = batch_of_cells(cells, seed, member, nb)
    scale = cell_scale(n, n_sel, n_cells_total, n_part)
    weight = cell_weight(n, n_sel)
    target = target_of_cells(cells) if len(cells) else np.zeros(0)
    grouped = sorted_by_cell_and_id(cell, pid)
    if grouped:
        porder, p_edges = _batch_rows_grouped(selected, cell, cells, bcell, nb)
        first_row = np.cumsum(n) - n  # rows grouped by cell: cell k's rows start here
    else:  # one sort of the selected rows by (batch, cell, pid)
        sel = np.nonzero(selected)[0]
        pc = cell[sel]
        pb = bcell[np.searchsorted(cells, pc)]
        porder = sel[np.lexsort((pid[sel], pc, pb))]
        p_edges = np.searchsorted(np.sort(pb), np.arange(nb + 1))
        del sel, pc, pb
    del selected
    corder = np.lexsort((cells, bcell))
    c_edges = np.searchsorted(bcell[corder], np.arange(nb + 1))
    counts = global_sum(comm, np.diff(p_edges).astype(np.int64))
    c_n = np.bincount(bcell, weights=n, minlength=nb) if len(cells) else np.zeros(nb)
    c_t = np.bincount(bcell, weights=1.0 + np.asarray(target, np.float64), minlength=nb) if len(cells) else np.zeros(nb)
    n_all = global_sum(comm, np.rint(c_n).astype(np.int64))
    true_sum = global_sum(comm, np.asarray(c_t, np.float64)) * (n_part / n_cells_total)
    batches = []
    pidx_dtype = np.int32 if len(theta) < 2**31 else np.int64
    porder = porder.astype(pidx_dtype, copy=False)
    for b in range(nb):
        pidx = porder[p_edges[b]:p_edges[b + 1]]
        cidx = corder[c_edges[b]:c_edges[b + 1]]
        if grouped:  # the batch-local cell is found per step from the cells' first rows
            where = {"cell_rows": first_row[cidx].astype(pidx_dtype)}
        else:
            where = {"stored_idx": torch.as_tensor(np.searchsorted(cells[cidx], cell[pidx]).astype(np.int32),
                                                   device=device)}
        batches.append(Batch(
            theta=theta,
            scale=torch.as_tensor(scale[cidx], dtype=dtype, device=device),
            weight=torch.as_tensor(weight[cidx], dtype=dtype, device=device),
            target=torch.as_tensor(target[cidx], dtype=dtype, device=device),
            n_global=int(counts[b]), n_all=int(n_all[b]), true_sum=float(true_sum[b]),
            pidx=pidx, box=box, **where))
    return BatchSet(batches, total, len(cells), int(np.sum(n_all)))


def _batch_rows_grouped(selected, cell, cells, bcell, nb: int, chunk: int = ROWS_PER_STEP):
    """The selected rows ordered by (batch, row) with each batch's edges, for rows ordered by
    (cell, pid): then (batch, row) is (batch, cell, pid), the order of the general path. A counting
    sort in two passes over chunks: 4 B per selected particle (int32 rows) and O(chunk) temporaries."""
    counts = np.zeros(nb, np.int64)
    for lo in range(0, len(cell), chunk):
        rows = lo + np.flatnonzero(selected[lo:lo + chunk])
        counts += np.bincount(bcell[np.searchsorted(cells, cell[rows])], minlength=nb)
    p_edges = np.concatenate([[0], np.cumsum(counts)])
    porder = np.empty(int(p_edges[-1]), np.int32 if len(cell) < 2**31 else np.int64)
    nxt = p_edges[:-1].copy()
    for lo in range(0, len(cell), chunk):
        rows = lo + np.flatnonzero(selected[lo:lo + chunk])
        pb = bcell[np.searchsorted(cells, cell[rows])]
        order = np.argsort(pb, kind="stable")
        bs = pb[order]
        per = np.bincount(bs, minlength=nb)
        first = np.cumsum(per) - per
        porder[nxt[bs] + (np.arange(len(bs)) - first[bs])] = rows[order]
        nxt += per
    return porder, p_edges


def interleave(sets: list[BatchSet]) -> BatchSet:
    """One :class:`BatchSet` of the batches of several simulations, alternating between them (the
    order inside an epoch is then drawn from (seed, member, epoch) by ``sampling.batch_order``)."""
    if len(sets) == 1:
        return sets[0]
    batches = [b for group in itertools.zip_longest(*(s.batches for s in sets)) for b in group if b is not None]
    return BatchSet(batches, sum(s.n_selected for s in sets), sum(s.n_cells_local for s in sets),
                    sum(s.n_particles for s in sets))
