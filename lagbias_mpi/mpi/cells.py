"""Cell ownership of the training grid: contiguous ranges of the flat cell index, balanced by particle
count (DESIGN.md section 2, step 4). Pure functions, no MPI.

Rank ``r`` owns the flat cells ``[edges[r], edges[r + 1])`` of a grid of ``n_cells`` cells. The cuts are
placed at the cell boundary nearest to where the global cumulative particle count crosses ``k N / P``
(``k = 1 .. P-1``), then moved the least needed so that every rank owns at least one cell when there
are at least as many cells as ranks (ranks beyond ``n_cells`` own none). With many more cells than
ranks, the particles per rank are then ``N / P`` up to the count of one cell at each cut.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lagbias_mpi.mpi.layout import slab_starts


def balanced_edges(counts: np.ndarray, size: int) -> np.ndarray:
    """Edges (``size + 1`` int64, ``edges[0] = 0``, ``edges[-1] = len(counts)``) of ``size`` contiguous
    cell ranges holding about ``sum(counts) / size`` particles each. ``counts``: global particle
    count of every flat cell. Without particles the cells are split evenly."""
    counts = np.asarray(counts)
    n = len(counts)
    if size < 1:
        raise ValueError(f"cell ownership needs at least one rank, got {size}")
    if counts.ndim != 1 or (n and counts.min() < 0):
        raise ValueError("cell counts must be a 1-d array of non-negative integers")
    cum = np.zeros(n + 1, np.int64)
    np.cumsum(counts, dtype=np.int64, out=cum[1:])
    total = int(cum[-1])
    if total == 0:
        return slab_starts(n, size).astype(np.int64)
    ks, cuts = cuts_in_piece(cum, 0, total, size)
    return edges_from_cuts(cuts[np.argsort(ks)], n, size)


def cuts_in_piece(cum_piece: np.ndarray, first_cell: int, total: int, size: int):
    """The cuts of :func:`balanced_edges` that fall in one contiguous piece of the grid: ``cum_piece``
    is the global cumulative count at the piece's cell boundaries ``first_cell .. first_cell + m``
    (``m + 1`` values), ``total`` the global particle count. Returns ``(k, cut)``: for each target
    ``k N / size`` (``k = 1 .. size-1``) with ``cum_piece[0] < target <= cum_piece[-1]``, the
    boundary nearest to it (the upper one on a tie). Every target falls in exactly one piece of a
    partition of the grid (pure)."""
    cum_piece = np.asarray(cum_piece, np.int64)
    targets = total * np.arange(1, size, dtype=np.float64) / size
    k = np.nonzero((targets > cum_piece[0]) & (targets <= cum_piece[-1]))[0]
    t = targets[k]
    above = np.searchsorted(cum_piece, t, side="left")  # first boundary with cum >= target (>= 1)
    below = above - 1
    cuts = np.where(cum_piece[above] - t <= t - cum_piece[below], above, below) + int(first_cell)
    return k + 1, cuts.astype(np.int64)


def edges_from_cuts(cuts: np.ndarray, n: int, size: int) -> np.ndarray:
    """Edges from the ``size - 1`` cuts, moved the least needed so that every rank owns at least one
    cell when there are at least as many cells as ranks (pure)."""
    edges = np.concatenate([[0], np.asarray(cuts, np.int64), [n]]).astype(np.int64)
    if size <= n:  # every rank owns at least one cell: edges strictly increasing, edges[k] <= n - (size - k)
        k = np.arange(size + 1, dtype=np.int64)
        edges = np.maximum.accumulate(edges - k) + k
        edges = np.minimum(edges, n - size + k)
    else:
        edges = np.maximum.accumulate(np.minimum(edges, n))
    edges[0], edges[-1] = 0, n
    return edges


def range_overlaps(src_edges: np.ndarray, dst_edges: np.ndarray, rank: int):
    """Counts and displacements of redistributing a 1-d array held in contiguous pieces
    ``[src_edges[r], src_edges[r+1])`` into pieces ``[dst_edges[r], dst_edges[r+1])``, seen from
    ``rank``: ``(send_counts, send_displs, recv_counts, recv_displs)`` int64 arrays over ranks."""
    src_edges, dst_edges = np.asarray(src_edges, np.int64), np.asarray(dst_edges, np.int64)
    if src_edges[-1] != dst_edges[-1] or len(src_edges) != len(dst_edges):
        raise ValueError(f"cannot redistribute {src_edges[-1]} elements into {dst_edges[-1]}")
    lo, hi = src_edges[rank], src_edges[rank + 1]
    s_lo, s_hi = np.clip(dst_edges[:-1], lo, hi), np.clip(dst_edges[1:], lo, hi)
    dlo, dhi = dst_edges[rank], dst_edges[rank + 1]
    r_lo, r_hi = np.clip(src_edges[:-1], dlo, dhi), np.clip(src_edges[1:], dlo, dhi)
    return s_hi - s_lo, s_lo - lo, r_hi - r_lo, r_lo - dlo


@dataclass(frozen=True)
class CellOwnership:
    """Which rank owns which flat cell: rank ``r`` owns ``[edges[r], edges[r+1])``."""

    n_cells: int
    edges: np.ndarray

    @classmethod
    def balanced(cls, counts: np.ndarray, size: int) -> "CellOwnership":
        return cls(len(counts), balanced_edges(counts, size))

    @classmethod
    def by_planes(cls, n_grid: int, size: int) -> "CellOwnership":
        """The ownership of the plane slabs (the FFT's and the painter's layout)."""
        return cls(n_grid**3, slab_starts(n_grid, size).astype(np.int64) * n_grid * n_grid)

    @property
    def size(self) -> int:
        return len(self.edges) - 1

    def bounds(self, rank: int) -> tuple[int, int]:
        return int(self.edges[rank]), int(self.edges[rank + 1])

    def counts(self) -> np.ndarray:
        """Cells owned by every rank."""
        return np.diff(self.edges)

    def owner(self, cells) -> np.ndarray:
        """Rank owning each flat cell id (int64 array)."""
        cells = np.asarray(cells, np.int64)
        if cells.size and (cells.min() < 0 or cells.max() >= self.n_cells):
            raise ValueError(f"cell ids outside [0, {self.n_cells})")
        return np.searchsorted(self.edges, cells, side="right").astype(np.int64) - 1

    def local_values(self, values: np.ndarray, rank: int, cells: np.ndarray) -> np.ndarray:
        """Values at flat ``cells`` (all owned by ``rank``) of the owned piece ``values`` of a grid."""
        lo, hi = self.bounds(rank)
        cells = np.asarray(cells, np.int64)
        if cells.size and (cells.min() < lo or cells.max() >= hi):
            raise ValueError(f"cells outside the range [{lo}, {hi}) owned by rank {rank}")
        return np.asarray(values)[cells - lo]
