"""Two-stage particle routing (DESIGN.md section 2, steps 3-4).

1. Lagrangian: each particle goes to the rank owning the IC slab plane of its nearest IC grid point
   ``idx_ic = round(lagr_index * n_ic / ppd) mod n_ic`` and reads its features there.
2. Eulerian: each particle goes to the rank owning its final NGP cell on the training grid, so that
   every cell and all its particles live on one rank. Cells are owned in contiguous ranges of the
   flat cell index balanced by particle count (:mod:`lagbias_mpi.mpi.cells`, from one histogram
   Allreduce), so every rank trains and holds about N / P particles.

Particle counts are checked by :func:`lagbias_mpi.mpi.exchange.exchange` after each exchange.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from lagbias_mpi.core.arrays import permute_rows_in_place
from lagbias_mpi.core.memory import ROWS_PER_STEP
from lagbias_mpi.mesh.grid import cell_index, ic_index
from lagbias_mpi.mpi.cells import CellOwnership, balanced_edges, cuts_in_piece, edges_from_cuts
from lagbias_mpi.mpi.exchange import exchange, redistribute_ranges
from lagbias_mpi.mpi.layout import plane_owner




def route_lagrangian(comm, columns: dict[str, np.ndarray], ppd: int, n_ic: int, what="particles",
                     stats: list | None = None, with_ic_index: bool = True) -> dict[str, np.ndarray]:
    """Send particle columns (must contain ``lagr_index``) to the owner of their IC plane; the
    result has an extra ``ic_index`` column (unless not ``with_ic_index``). Collective. The exchange
    consumes ``columns`` (the dict is emptied; arrays the caller references nowhere else are cut as
    they are sent)."""
    lagr = columns["lagr_index"]
    dest = np.empty(len(lagr), np.int32 if comm.size < 2**31 else np.int64)
    for lo in range(0, len(lagr), ROWS_PER_STEP):  # the (n, 3) IC index of one chunk at a time
        dest[lo:lo + ROWS_PER_STEP] = plane_owner(ic_index(lagr[lo:lo + ROWS_PER_STEP, :1], ppd, n_ic)[:, 0],
                                                    n_ic, comm.size)
    del lagr
    if "_dest" in columns:
        raise ValueError("'_dest' is reserved")
    columns["_dest"] = dest
    del dest
    got, st = exchange(comm, columns, "_dest", what=f"{what} (Lagrangian routing)", return_stats=True,
                       consume=True)
    if with_ic_index:
        got["ic_index"] = ic_index(got["lagr_index"], ppd, n_ic)  # recomputed here: 24 B less on the wire
    if stats is not None:
        stats.append(("lagrangian", st))
    return got


def cell_dtype(n_cells: int) -> np.dtype:
    """Dtype of flat cell ids: int32 below 2^31 cells (1290^3), else int64 (pure)."""
    return np.dtype(np.int32 if n_cells < 2**31 else np.int64)


def flat_cells(pos: np.ndarray, n_grid: int, box: float, chunk: int = ROWS_PER_STEP) -> np.ndarray:
    """Global flat training-cell id of each position (NGP), as :func:`cell_dtype`; computed in chunks
    (the (n, 3) int64 index and float64 coordinates of one chunk at a time)."""
    out = np.empty(len(pos), cell_dtype(n_grid**3))
    for lo in range(0, len(pos), chunk):
        ci = cell_index(pos[lo:lo + chunk], n_grid, box)
        out[lo:lo + chunk] = (ci[:, 0] * n_grid + ci[:, 1]) * n_grid + ci[:, 2]
    return out


def local_cell_counts(pos: np.ndarray, n_grid: int, box: float) -> tuple[np.ndarray, np.ndarray]:
    """(occupied flat cells, their particle counts), both int64, of this rank's positions: sparse
    (16 B per occupied cell), a chunk of particles at a time, merged as they come (pure)."""
    cells, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for lo in range(0, len(pos), ROWS_PER_STEP):
        u, c = np.unique(flat_cells(pos[lo:lo + ROWS_PER_STEP], n_grid, box), return_counts=True)
        cells, inv = np.unique(np.concatenate([cells, u.astype(np.int64)]), return_inverse=True)
        counts = np.bincount(inv, weights=np.concatenate([counts, c]), minlength=len(cells)).astype(np.int64)
    return cells, counts


def slab_cell_counts(comm, pos: np.ndarray, n_grid: int, box: float) -> np.ndarray:
    """Global particle count (int64) of every cell of this rank's plane slab of the training grid,
    not of the whole grid: the sparse local counts go to the slab owners in one exchange. Collective."""
    cells, counts = local_cell_counts(pos, n_grid, box)
    planes = CellOwnership.by_planes(n_grid, comm.size)
    dest = planes.owner(cells).astype(np.int32) if len(cells) else np.zeros(0, np.int32)
    got = exchange(comm, {"cell": cells, "count": counts}, dest, what="cell counts")
    lo, hi = planes.bounds(comm.rank)
    return np.bincount(got["cell"] - lo, weights=got["count"], minlength=hi - lo).astype(np.int64)


def _ownership_and_counts(comm, pos, n_grid: int, box: float):
    """(ownership balanced by particle count, global particle count (int64) of each cell this rank
    owns), from the slab counts: one sparse exchange of the local counts, an Allgather of the slab
    totals and one of the cuts, a redistribution of the counts to the owners (collective). The cuts
    are those of :func:`lagbias_mpi.mpi.cells.balanced_edges` on the global histogram, which no
    rank holds."""
    n_cells = n_grid**3
    planes = CellOwnership.by_planes(n_grid, comm.size)
    slab = slab_cell_counts(comm, pos, n_grid, box)
    totals = np.array(comm.allgather(int(slab.sum())), np.int64)
    total = int(totals.sum())
    if total == 0:
        own = CellOwnership(n_cells, balanced_edges(np.zeros(n_cells, np.int64), comm.size))
    else:
        cum = np.empty(len(slab) + 1, np.int64)
        cum[0] = totals[:comm.rank].sum()
        np.cumsum(slab, out=cum[1:])
        cum[1:] += cum[0]
        ks, cuts = cuts_in_piece(cum, planes.bounds(comm.rank)[0], total, comm.size)
        del cum
        pairs = np.concatenate(comm.allgather(np.stack([ks, cuts], axis=1).reshape(-1, 2)))
        if len(pairs) != comm.size - 1:
            raise RuntimeError(f"cell ownership: {len(pairs)} cuts for {comm.size} ranks")
        cut = np.empty(comm.size - 1, np.int64)
        cut[pairs[:, 0] - 1] = pairs[:, 1]
        own = CellOwnership(n_cells, edges_from_cuts(cut, n_cells, comm.size))
    counts = redistribute_ranges(comm, slab, planes.edges, own.edges)
    return own, counts


def cell_order_destinations(cell: np.ndarray, lo: int, counts: np.ndarray, chunk: int = ROWS_PER_STEP) -> np.ndarray:
    """Row of each particle once the rows are grouped by cell in increasing id, in their present
    order inside a cell (a stable counting sort, a chunk at a time): ``cell`` the flat ids, all in
    the owned range starting at ``lo``, ``counts`` the particles of each owned cell (which must be
    what ``cell`` holds). int32 below 2^31 rows."""
    n_own = len(counts)
    nxt = (np.cumsum(counts) - counts).astype(np.int64)  # first free row of each cell
    dest = np.empty(len(cell), np.int32 if len(cell) < 2**31 else np.int64)
    for a in range(0, len(cell), chunk):
        c = cell[a:a + chunk].astype(np.int64) - lo
        if len(c) and (c.min() < 0 or c.max() >= n_own):
            raise ValueError("Eulerian routing: a particle arrived at a rank that does not own its cell")
        order = np.argsort(c, kind="stable")
        cs = c[order]
        per = np.bincount(cs, minlength=n_own)
        first = np.cumsum(per) - per
        dest[a + order] = nxt[cs] + (np.arange(len(cs)) - first[cs])
        nxt += per
    if not np.array_equal(nxt, np.cumsum(counts)):
        raise ValueError("Eulerian routing: the cells received other particle counts than the histogram")
    return dest


def sort_cells_by_id(columns: dict[str, np.ndarray], counts: np.ndarray, key: str = "pid",
                     chunk: int = ROWS_PER_STEP) -> None:
    """Order the rows of each cell by ``columns[key]`` in place (rows already grouped by cell with
    ``counts`` rows per cell), a chunk of whole cells at a time: O(chunk) temporaries."""
    ends = np.cumsum(counts)
    n, a = (int(ends[-1]) if len(ends) else 0), 0
    while a < n:
        first = np.searchsorted(ends, a, side="right")  # the cell holding row a
        last = max(np.searchsorted(ends, a + chunk, side="right") - 1, first)  # whole cells up to a + chunk
        b = int(ends[last])
        seg = np.searchsorted(ends, np.arange(a, b), side="right")  # cell of each row of the chunk
        perm = np.lexsort((columns[key][a:b], seg))
        del seg
        for col in columns.values():
            col[a:b] = col[a:b][perm]
        a = b


def route_eulerian(comm, columns: dict[str, np.ndarray], n_grid: int, box: float, what="particles",
                   stats: list | None = None, sort_key: str | None = "pid") -> tuple[dict[str, np.ndarray], CellOwnership]:
    """Send particle columns (must contain ``pos``) to the owner of their training-grid cell; returns
    the received columns with an extra ``cell`` column (global flat cell id, :func:`cell_dtype`) and
    the :class:`CellOwnership` (balanced by particle count). Collective.

    The rows end grouped by cell in increasing cell id (a counting sort from the global histogram,
    applied in place to every column) and, with ``sort_key``, ordered by that column inside each
    cell: the layout is independent of the number of ranks. The exchange consumes ``columns`` (the
    dict is emptied; arrays the caller references nowhere else are cut as they are sent): beyond
    the particles the routing holds 4 B of destination per particle (plus 4 B of cell id and 1 B of
    flags during the sort) and one exchange round."""
    pos = columns["pos"]
    own, counts = _ownership_and_counts(comm, pos, n_grid, box)
    dest = np.empty(len(pos), np.int32 if comm.size < 2**31 else np.int64)
    for lo in range(0, len(pos), ROWS_PER_STEP):
        dest[lo:lo + ROWS_PER_STEP] = own.owner(flat_cells(pos[lo:lo + ROWS_PER_STEP], n_grid, box))
    del pos
    if "_dest" in columns:
        raise ValueError("'_dest' is reserved")
    columns["_dest"] = dest
    del dest  # cells are recomputed from the positions at the destination: nothing more on the wire
    got, st = exchange(comm, columns, "_dest", what=f"{what} (Eulerian routing)", return_stats=True,
                       consume=True)
    lo = own.bounds(comm.rank)[0]
    cell = flat_cells(got["pos"], n_grid, box)
    dest = cell_order_destinations(cell, lo, counts)
    del cell  # rebuilt from the counts once the rows are grouped
    for col in got.values():  # in place: one row of scratch, no second copy of a column
        permute_rows_in_place(col, dest)
    del dest
    if sort_key is not None and sort_key in got:
        sort_cells_by_id(got, counts, sort_key)
    got["cell"] = np.repeat(np.arange(lo, lo + len(counts), dtype=cell_dtype(n_grid**3)), counts)
    if stats is not None:
        stats.append(("eulerian", st))
    return got, own


def slab_to_owners(comm, slab: np.ndarray, n_grid: int, own: CellOwnership) -> np.ndarray:
    """Values of a grid held as plane slabs (the painter's layout) at the cells each rank owns:
    a 1-d array over this rank's range of ``own`` (collective)."""
    planes = CellOwnership.by_planes(n_grid, comm.size)
    return redistribute_ranges(comm, slab, planes.edges, own.edges)


def owners_to_slab(comm, values: np.ndarray, n_grid: int, own: CellOwnership) -> np.ndarray:
    """Inverse of :func:`slab_to_owners`: the flat values of this rank's plane slab (collective)."""
    planes = CellOwnership.by_planes(n_grid, comm.size)
    return redistribute_ranges(comm, values, own.edges, planes.edges)
