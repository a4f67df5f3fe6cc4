"""Per-cell sub-sampling and batch membership as pure functions of global ids and the seed.

Nothing here depends on a rank's random stream, so the selected particles and the batches are the
same on any number of ranks:

- a particle's priority inside its cell is ``hash(particle id, seed, member)``; a cell with n
  particles keeps the n_sel = max(int(frac * n), 1) of lowest priority (``frac`` a number, or
  ``"auto"`` resolved by :func:`resolve_frac` from the mean occupancy of the cells);
- a cell's batch is ``floor(u * n_batches)`` with ``u = hash(cell id, seed, member)`` in [0, 1);
- the order of the batches in an epoch is a permutation drawn from ``(seed, member, epoch)``.

The hash is splitmix64's finaliser applied to a combination of the inputs (vectorised, uint64).
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.core.hashing import splitmix64
from lagbias_mpi.core.memory import ROWS_PER_STEP

SALT_PARTICLE = 0x5E1EC7


SALT_BATCH = 0xBA7C4


def hash_ids(ids: np.ndarray, seed: int, member: int, salt: int) -> np.ndarray:
    """Hash of (id, seed, member, salt) -> uint64, identical on every rank."""
    key = splitmix64(np.array([(int(seed) & 0xFFFFFFFF) << 32 | (int(member) & 0xFFFF) << 16 | (salt & 0xFFFF)],
                              dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return splitmix64(splitmix64(np.asarray(ids, dtype=np.uint64)) ^ key)


def hash_uniform(ids: np.ndarray, seed: int, member: int, salt: int) -> np.ndarray:
    """Uniform float64 in [0, 1) from :func:`hash_ids` (53 high bits)."""
    return (hash_ids(ids, seed, member, salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def n_selected(n: np.ndarray, frac: float) -> np.ndarray:
    """Particles kept in a cell of n particles: max(int(frac * n), 1) (0 for an empty cell)."""
    n = np.asarray(n, dtype=np.int64)
    return np.where(n > 0, np.maximum((frac * n).astype(np.int64), 1), 0)


PAPER_FRAC = 0.1  # the paper's fraction, meant for ~500 particles per 5 Mpc/h cell (AbacusSummit)


def resolve_frac(frac, per_cell: float, n_part: int, n_cells_total: int) -> float:
    """The selected fraction per cell: ``frac`` when it is a number; for ``"auto"``,
    per_cell / (N_part / N_cells) (on average ``per_cell`` selected particles per cell), at least
    the paper's 10% (AbacusSummit's ~500 particles per cell keep 10%) and at most 1 (pure)."""
    if frac != "auto":
        return float(frac)
    occupancy = n_part / max(int(n_cells_total), 1)
    return float(min(max(per_cell / max(occupancy, 1e-300), PAPER_FRAC), 1.0))


def cell_weight(n: np.ndarray, n_sel: np.ndarray) -> np.ndarray:
    """Weight n_j / n_sel_j of each selected particle of cell j (eq. 2.5): the particles it stands
    for; 0 for a cell without selected particles."""
    n, n_sel = np.asarray(n, np.float64), np.asarray(n_sel, np.float64)
    return np.divide(n, n_sel, out=np.zeros_like(n), where=n_sel > 0)


def cell_scale(n: np.ndarray, n_sel: np.ndarray, n_cells_total: int, n_part: int) -> np.ndarray:
    """Per-cell factor of the model field, 1 + delta_model[j] = scale_j sum_{selected i in j} f_i:
    scale_j = (N_cells / N_part) n_j / n_sel_j (0 for a cell without selected particles). The one
    implementation used by the batches, the Fourier-space loss and the least squares."""
    return (n_cells_total / n_part) * cell_weight(n, n_sel)


def sorted_by_cell_and_id(cell: np.ndarray, pid: np.ndarray, chunk: int = ROWS_PER_STEP) -> bool:
    """Whether the rows are ordered by (cell, pid), as the Eulerian routing leaves them (checked a
    chunk at a time)."""
    cell, pid = np.asarray(cell), np.asarray(pid)
    for lo in range(0, max(len(cell) - 1, 0), chunk):
        c, p = cell[lo:lo + chunk + 1], pid[lo:lo + chunk + 1]
        if not np.all((c[1:] > c[:-1]) | ((c[1:] == c[:-1]) & (p[1:] > p[:-1]))):
            return False
    return True


def _select(cell, pid, frac, seed, member):
    prio = hash_ids(pid, seed, member, SALT_PARTICLE)
    order = np.lexsort((np.asarray(pid, dtype=np.uint64), prio, cell))
    del prio
    cells, first, n = np.unique(cell[order], return_index=True, return_counts=True)
    rank_in_cell = np.arange(len(cell)) - np.repeat(first, n)
    keep = n_selected(n, frac)
    selected = np.zeros(len(cell), dtype=bool)
    selected[order] = rank_in_cell < np.repeat(keep, n)
    return selected, cells, n, keep


def select_in_cells(cell: np.ndarray, pid: np.ndarray, frac: float, seed: int, member: int,
                    chunk: int = ROWS_PER_STEP):
    """Sub-sample particles per cell (all particles of a cell must be on this rank).

    Returns ``(selected, cells, n, n_sel)``: a boolean mask over the particles, the sorted unique
    cell ids present, their particle counts and selected counts. Rows grouped by cell in increasing
    id (the Eulerian routing's layout) are done a chunk of whole cells at a time (O(chunk)
    temporaries); other layouts with one sort of all rows (~50 B per particle of temporaries).
    """
    cell = np.asarray(cell)  # int32 or int64 flat ids (no converted copy)
    n_rows = len(cell)
    grouped = all(np.all(np.diff(cell[lo:lo + chunk + 1]) >= 0) for lo in range(0, max(n_rows - 1, 0), chunk))
    if not grouped:
        return _select(cell, pid, frac, seed, member)
    selected = np.empty(n_rows, dtype=bool)
    got, lo = [], 0
    while lo < n_rows:
        hi = min(lo + chunk, n_rows)
        if hi < n_rows:  # up to the end of the cell of row hi - 1
            hi = int(np.searchsorted(cell, cell[hi - 1], side="right"))
        sel, cells, n, keep = _select(cell[lo:hi], pid[lo:hi], frac, seed, member)
        selected[lo:hi] = sel
        got.append((cells, n, keep))
        lo = hi
    if not got:
        return selected, np.zeros(0, cell.dtype), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (selected, *(np.concatenate([g[i] for g in got]) for i in range(3)))


def n_batches_for(total_selected: int, batch_size: int) -> int:
    """Number of batches: round(total selected / batch size), at least 1."""
    return max(int(round(total_selected / batch_size)), 1)


def batch_of_cells(cells: np.ndarray, seed: int, member: int, n_batches: int) -> np.ndarray:
    """Batch id in [0, n_batches) of each global cell id."""
    u = hash_uniform(cells, seed, member, SALT_BATCH)
    return np.minimum((u * n_batches).astype(np.int64), n_batches - 1)


def batch_order(n_batches: int, seed: int, member: int, epoch: int) -> np.ndarray:
    """Order in which the batches are processed in ``epoch``: fixed by seed, member and epoch."""
    return np.random.default_rng([int(seed), int(member), int(epoch), 0xB0]).permutation(n_batches)
