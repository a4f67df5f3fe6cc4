"""Grid arithmetic shared by every mesh: cell of a position, IC grid point of a lattice index.
"""
from __future__ import annotations

import numpy as np


def wrap_unit(x, box: float) -> np.ndarray:
    """Any periodic image of positions in Mpc/h (centred box) -> [0, box), float64:
    (x + box/2) mod box, with the rounding edge at box mapped to 0."""
    data = np.mod(np.asarray(x, dtype=np.float64) + 0.5 * box, box)
    data[data >= box] = 0.0
    return data


def wrap_centred(x, box: float) -> np.ndarray:
    """Any periodic image of positions in Mpc/h -> [-box/2, box/2), float64:
    (x + box/2) mod box - box/2, with the rounding edge at +box/2 mapped to -box/2."""
    out = np.mod(np.asarray(x, dtype=np.float64) + 0.5 * box, box) - 0.5 * box
    out[out >= 0.5 * box] = -0.5 * box
    return out


def wrap_positions(pos, box: float, out: np.ndarray | None = None) -> np.ndarray:
    """Positions wrapped into [-box/2, box/2) as float32 (into ``out`` if given). Only the few
    entries outside the interval after the float32 cast (e.g. exactly +box/2) are wrapped, with
    :func:`wrap_centred` in float64, so no float64 copy of the whole array is made."""
    half = np.float32(0.5 * box)
    if out is None:
        out = np.empty(np.shape(pos), dtype=np.float32)
    out[...] = pos
    bad = (out >= half) | (out < -half)
    if bad.any():
        x = wrap_centred(np.asarray(pos, dtype=np.float64)[bad], box).astype(np.float32)
        x[x >= half] = -half  # the float32 cast can round up to +box/2
        out[bad] = x
    return out


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


def lattice_index(pid: np.ndarray, ppd: int) -> np.ndarray:
    """Inverse of :func:`particle_id`: the lattice indices (n, 3) int64 of global particle ids."""
    p = np.asarray(pid, dtype=np.int64)
    out = np.empty((len(p), 3), np.int64)
    out[:, 0], rest = np.divmod(p, ppd * ppd)
    out[:, 1], out[:, 2] = np.divmod(rest, ppd)
    return out
