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

from lagbias_mpi.mesh.grid import cell_index, ic_index
from lagbias_mpi.mpi.cells import CellOwnership
from lagbias_mpi.mpi.exchange import exchange, redistribute_ranges
from lagbias_mpi.mpi.layout import plane_owner


def route_lagrangian(comm, columns: dict[str, np.ndarray], ppd: int, n_ic: int, what="particles",
                     stats: list | None = None, with_ic_index: bool = True) -> dict[str, np.ndarray]:
    """Send particle columns (must contain ``lagr_index``) to the owner of their IC plane; the
    result has an extra ``ic_index`` column (unless not ``with_ic_index``). Collective."""
    plane = ic_index(columns["lagr_index"], ppd, n_ic)[:, 0] if len(columns["lagr_index"]) else np.zeros(0, np.int64)
    dest = plane_owner(plane, n_ic, comm.size) if len(plane) else np.zeros(0, np.int64)
    del plane
    got, st = exchange(comm, dict(columns), np.asarray(dest, np.int64), what=f"{what} (Lagrangian routing)",
                       return_stats=True)
    if with_ic_index:
        got["ic_index"] = ic_index(got["lagr_index"], ppd, n_ic)  # recomputed here: 24 B less on the wire
    if stats is not None:
        stats.append(("lagrangian", st))
    return got


HISTOGRAM_CHUNK = 1 << 22  # particles per step of the cell histogram


def flat_cells(pos: np.ndarray, n_grid: int, box: float) -> np.ndarray:
    """Global flat training-cell id (int64) of each position (NGP)."""
    if not len(pos):
        return np.zeros(0, np.int64)
    ci = cell_index(pos, n_grid, box)
    return (ci[:, 0] * n_grid + ci[:, 1]) * n_grid + ci[:, 2]


def cell_histogram(comm, cells: np.ndarray, n_cells: int) -> np.ndarray:
    """Global particle count of every flat cell (int32 on every rank: 4 B per cell; one Allreduce).
    Collective."""
    hist = np.zeros(n_cells, np.int32)
    for lo in range(0, len(cells), HISTOGRAM_CHUNK):
        u, c = np.unique(cells[lo:lo + HISTOGRAM_CHUNK], return_counts=True)
        hist[u] += c.astype(np.int32)
    if comm.size > 1:
        comm.Allreduce(MPI.IN_PLACE, hist, op=MPI.SUM)
    return hist


def balanced_ownership(comm, cells: np.ndarray, n_cells: int) -> CellOwnership:
    """Cell ownership balanced by the global particle count of ``cells`` (collective)."""
    hist = cell_histogram(comm, cells, n_cells)
    own = CellOwnership.balanced(hist, comm.size)
    del hist
    return own


def route_eulerian(comm, columns: dict[str, np.ndarray], n_grid: int, box: float, what="particles",
                   stats: list | None = None) -> tuple[dict[str, np.ndarray], CellOwnership]:
    """Send particle columns (must contain ``pos``) to the owner of their training-grid cell; returns
    the received columns with an extra ``cell`` column (global flat cell id, int64) and the
    :class:`CellOwnership` (balanced by particle count). Collective."""
    cells = flat_cells(columns["pos"], n_grid, box)
    own = balanced_ownership(comm, cells, n_grid**3)
    dest = own.owner(cells).astype(np.int32 if comm.size < 2**31 else np.int64)
    del cells  # recomputed from the positions at the destination: 8 B per particle less on the wire
    got, st = exchange(comm, dict(columns), dest, what=f"{what} (Eulerian routing)", return_stats=True)
    del dest
    got["cell"] = flat_cells(got["pos"], n_grid, box)
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
