"""Global batches of training cells: the selected particles of each batch on this rank as contiguous tensors,
with the per-cell scale and targets (paper eq. 2.5); the same batches on any number of ranks.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.training.sampling import batch_of_cells, n_batches_for, select_in_cells


@dataclass
class Batch:
    """This rank's part of one global batch, as contiguous tensors."""

    x: torch.Tensor  # (n_b, n_in) inputs of the selected particles
    idx: torch.Tensor  # (n_b,) cell of each particle, local to the batch
    scale: torch.Tensor  # (n_cells_b,) N_cells/N_part * n/n_sel
    target: torch.Tensor  # (n_cells_b,) delta_true
    n_global: int  # selected particles of the batch over all ranks
    pidx: np.ndarray  # (n_b,) indices of the particles among the rank's particles of the simulation
    box: int = 0  # which training simulation (for the Fourier-space loss's coefficients)

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.x, self.idx, self.scale, self.target))


@dataclass
class BatchSet:
    batches: list[Batch]
    n_selected: int  # global
    n_cells_local: int

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
    scale = (n_cells_total / n_part) * n / n_sel
    target = target_of_cells(cells) if len(cells) else np.zeros(0)
    sel = np.nonzero(selected)[0]
    pc = cell[sel]
    pb = bcell[np.searchsorted(cells, pc)]
    porder = sel[np.lexsort((pid[sel], pc, pb))]
    p_edges = np.searchsorted(np.sort(pb), np.arange(nb + 1))
    corder = np.lexsort((cells, bcell))
    c_edges = np.searchsorted(bcell[corder], np.arange(nb + 1))
    counts = global_sum(comm, np.diff(p_edges).astype(np.int64))
    batches = []
    for b in range(nb):
        pidx = porder[p_edges[b]:p_edges[b + 1]]
        cidx = corder[c_edges[b]:c_edges[b + 1]]
        local_cell = np.searchsorted(cells[cidx], cell[pidx])
        batches.append(Batch(
            x=torch.as_tensor(np.ascontiguousarray(theta[pidx]), dtype=dtype, device=device),
            idx=torch.as_tensor(local_cell, dtype=torch.long, device=device),
            scale=torch.as_tensor(scale[cidx], dtype=dtype, device=device),
            target=torch.as_tensor(target[cidx], dtype=dtype, device=device),
            n_global=int(counts[b]), pidx=pidx, box=box))
    return BatchSet(batches, total, len(cells))


def interleave(sets: list[BatchSet]) -> BatchSet:
    """One :class:`BatchSet` of the batches of several simulations, alternating between them (the
    order inside an epoch is then drawn from (seed, member, epoch) by ``sampling.batch_order``)."""
    if len(sets) == 1:
        return sets[0]
    batches = [b for group in itertools.zip_longest(*(s.batches for s in sets)) for b in group if b is not None]
    return BatchSet(batches, sum(s.n_selected for s in sets), sum(s.n_cells_local for s in sets))
