"""Two-stage particle routing (DESIGN.md section 2, steps 3-4).

1. Lagrangian: each particle goes to the rank owning the IC slab plane of its nearest IC grid point
   ``idx_ic = round(lagr_index * n_ic / ppd) mod n_ic`` and reads its features there.
2. Eulerian: each particle goes to the rank owning the plane of its final NGP cell on the training
   grid, so that every cell and all its particles live on one rank.

Particle counts are checked by :func:`lagbias_mpi.mpi.exchange.exchange` after each exchange.
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.mesh.grid import cell_index, ic_index
from lagbias_mpi.mesh.paint import readout_index
from lagbias_mpi.mpi.exchange import exchange
from lagbias_mpi.mpi.layout import plane_owner


def route_lagrangian(comm, columns: dict[str, np.ndarray], ppd: int, n_ic: int, what="particles",
                     stats: list | None = None) -> dict[str, np.ndarray]:
    """Send particle columns (must contain ``lagr_index``) to the owner of their IC plane; the
    result has an extra ``ic_index`` column. Collective."""
    idx = ic_index(columns["lagr_index"], ppd, n_ic)
    dest = plane_owner(idx[:, 0], n_ic, comm.size) if len(idx) else np.zeros(0, np.int64)
    cols = dict(columns)
    cols["ic_index"] = idx
    got, st = exchange(comm, cols, np.asarray(dest, np.int64), what=f"{what} (Lagrangian routing)",
                       return_stats=True)
    if stats is not None:
        stats.append(("lagrangian", st))
    return got


def read_features(feature_slab: np.ndarray, ic_start: int, ic_idx: np.ndarray) -> np.ndarray:
    """Feature rows (n, n_feat) at the IC grid points ``ic_idx`` (routed to this slab)."""
    return np.ascontiguousarray(readout_index(feature_slab, ic_start, ic_idx))


def route_eulerian(comm, columns: dict[str, np.ndarray], n_grid: int, box: float, what="particles",
                   stats: list | None = None) -> dict[str, np.ndarray]:
    """Send particle columns (must contain ``pos``) to the owner of their training-grid cell plane;
    the result has an extra ``cell`` column (global flat cell id, int64). Collective."""
    ci = cell_index(columns["pos"], n_grid, box) if len(columns["pos"]) else np.zeros((0, 3), np.int64)
    dest = plane_owner(ci[:, 0], n_grid, comm.size) if len(ci) else np.zeros(0, np.int64)
    cols = dict(columns)
    cols["cell"] = (ci[:, 0] * n_grid + ci[:, 1]) * n_grid + ci[:, 2]
    got, st = exchange(comm, cols, np.asarray(dest, np.int64), what=f"{what} (Eulerian routing)",
                       return_stats=True)
    if stats is not None:
        stats.append(("eulerian", st))
    return got
