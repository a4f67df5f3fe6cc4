"""Grid arithmetic shared by every mesh: cell of a position, IC grid point of a lattice index.
"""
from __future__ import annotations

import numpy as np


def grid_coordinates(pos: np.ndarray, nmesh: int, box: float) -> np.ndarray:
    """Positions in Mpc/h (in [-box/2, box/2), any periodic image accepted) -> grid units in [0, n)."""
    u = (np.asarray(pos, dtype=np.float64) + 0.5 * box) * (nmesh / box)
    u = np.mod(u, nmesh)
    u[u >= nmesh] = 0.0  # mod can round up to n for tiny negative inputs
    return u


def cell_index(pos: np.ndarray, nmesh: int, box: float) -> np.ndarray:
    """NGP cell index (n_particles, 3) of each position: floor((x + box/2)/cell) mod n."""
    return np.floor(grid_coordinates(pos, nmesh, box)).astype(np.int64) % nmesh


def ic_index(lagr_index: np.ndarray, ppd: int, n_ic: int) -> np.ndarray:
    """Nearest IC grid point (n, 3) int64 of lattice indices: floor(l * n_ic / ppd + 1/2) mod n_ic
    (exact integer arithmetic)."""
    lagr = np.asarray(lagr_index, dtype=np.int64)
    return ((2 * lagr * n_ic + ppd) // (2 * ppd)) % n_ic


def particle_id(lagr_index: np.ndarray, ppd: int) -> np.ndarray:
    """Global particle id: the flattened lattice index (i * ppd + j) * ppd + k, uint64."""
    lagr = np.asarray(lagr_index, dtype=np.int64)
    return ((lagr[:, 0] * ppd + lagr[:, 1]) * ppd + lagr[:, 2]).astype(np.uint64)
