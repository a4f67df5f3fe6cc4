"""Mass assignment onto slab-decomposed grids and readout from them.

Grid convention (DESIGN.md): grid point ``i`` of an ``n``-cell axis sits at ``-box/2 + i*box/n``
and cell ``i`` is ``[-box/2 + i*cell, -box/2 + (i+1)*cell)``. NGP puts a particle in the cell
``floor((x + box/2)/cell) mod n``; CIC shares it between grid points ``i0 = floor(u)`` and
``i0 + 1`` with ``u = (x + box/2)/cell``. Both are periodic.

A particle is painted by the rank owning plane ``i0`` of its first coordinate (``route_to_slabs``
sends it there); CIC's contribution to plane ``stop`` of a slab lands in a ghost plane that is
sent to the neighbouring rank and added there. The sum of the weights is conserved exactly up to
float rounding (checked globally when ``check=True``).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .exchange import exchange
from .layout import plane_owner, slab_bounds
from .parallel import check_sum

METHODS = ("ngp", "cic")


def grid_coordinates(pos: np.ndarray, nmesh: int, box: float) -> np.ndarray:
    """Positions in Mpc/h (in [-box/2, box/2), any periodic image accepted) -> grid units in [0, n)."""
    u = (np.asarray(pos, dtype=np.float64) + 0.5 * box) * (nmesh / box)
    u = np.mod(u, nmesh)
    u[u >= nmesh] = 0.0  # mod can round up to n for tiny negative inputs
    return u


def cell_index(pos: np.ndarray, nmesh: int, box: float) -> np.ndarray:
    """NGP cell index (n_particles, 3) of each position: floor((x + box/2)/cell) mod n."""
    return np.floor(grid_coordinates(pos, nmesh, box)).astype(np.int64) % nmesh


def route_to_slabs(comm, pos: np.ndarray, columns: dict[str, np.ndarray], nmesh: int, box: float,
                   what: str = "particles") -> dict[str, np.ndarray]:
    """Send particles (``pos`` plus any columns) to the rank owning the slab of their NGP cell plane.
    Returns the received columns including ``pos``."""
    plane = cell_index(pos[:, :1], nmesh, box)[:, 0] if len(pos) else np.zeros(0, np.int64)
    dest = plane_owner(plane, nmesh, comm.size) if len(pos) else np.zeros(0, np.int64)
    cols = {"pos": np.asarray(pos)}
    cols.update(columns)
    return exchange(comm, cols, np.asarray(dest, dtype=np.int64), what=what)


@njit(cache=True)
def _paint_cic_kernel(grid, u, w, start):
    """Add CIC weights into ``grid`` (planes [start, start + grid.shape[0]) ). ``u`` in grid units."""
    nx, ny, nz = grid.shape
    for p in range(u.shape[0]):
        fx, fy, fz = np.floor(u[p, 0]), np.floor(u[p, 1]), np.floor(u[p, 2])
        dx, dy, dz = u[p, 0] - fx, u[p, 1] - fy, u[p, 2] - fz
        ix = int(fx) - start
        iy = int(fy) % ny
        iz = int(fz) % nz
        iy1 = (iy + 1) % ny
        iz1 = (iz + 1) % nz
        wp = w[p]
        for a in range(2):
            wa = wp * (dx if a else 1.0 - dx)
            x = ix + a
            grid[x, iy, iz] += wa * (1.0 - dy) * (1.0 - dz)
            grid[x, iy, iz1] += wa * (1.0 - dy) * dz
            grid[x, iy1, iz] += wa * dy * (1.0 - dz)
            grid[x, iy1, iz1] += wa * dy * dz


@njit(cache=True)
def _paint_ngp_kernel(grid, u, w, start):
    nx, ny, nz = grid.shape
    for p in range(u.shape[0]):
        ix = int(np.floor(u[p, 0])) - start
        iy = int(np.floor(u[p, 1])) % ny
        iz = int(np.floor(u[p, 2])) % nz
        grid[ix, iy, iz] += w[p]


@njit(cache=True)
def _readout_cic_kernel(grid, u, start, out):
    nx, ny, nz = grid.shape
    for p in range(u.shape[0]):
        fx, fy, fz = np.floor(u[p, 0]), np.floor(u[p, 1]), np.floor(u[p, 2])
        dx, dy, dz = u[p, 0] - fx, u[p, 1] - fy, u[p, 2] - fz
        ix = int(fx) - start
        iy = int(fy) % ny
        iz = int(fz) % nz
        iy1 = (iy + 1) % ny
        iz1 = (iz + 1) % nz
        acc = 0.0
        for a in range(2):
            wa = dx if a else 1.0 - dx
            x = ix + a
            acc += wa * ((1.0 - dy) * ((1.0 - dz) * grid[x, iy, iz] + dz * grid[x, iy, iz1])
                         + dy * ((1.0 - dz) * grid[x, iy1, iz] + dz * grid[x, iy1, iz1]))
        out[p] = acc


def _neighbours(comm, nmesh: int) -> tuple[int | None, int | None]:
    """(rank holding the plane after my slab, rank whose slab ends right before mine); None if I
    hold no plane."""
    start, stop = slab_bounds(nmesh, comm.size, comm.rank)
    if stop == start:
        return None, None
    nxt = plane_owner(stop % nmesh, nmesh, comm.size)
    prv = plane_owner((start - 1) % nmesh, nmesh, comm.size)
    return int(nxt), int(prv)


def _add_ghost_plane(comm, grid_with_ghost: np.ndarray, nmesh: int) -> np.ndarray:
    """Send the ghost plane (last) to the next slab's owner and add the one received to plane 0."""
    local = grid_with_ghost[:-1]
    nxt, prv = _neighbours(comm, nmesh)
    if nxt is None:
        return local
    ghost = np.ascontiguousarray(grid_with_ghost[-1])
    if nxt == comm.rank:
        local[0] += ghost
        return local
    recv = np.empty_like(ghost)
    comm.Sendrecv(ghost, dest=nxt, sendtag=71, recvbuf=recv, source=prv, recvtag=71)
    local[0] += recv
    return local


def _fetch_ghost_plane(comm, slab: np.ndarray, nmesh: int) -> np.ndarray:
    """Return the slab with the next rank's first plane appended (for CIC readout)."""
    nxt, prv = _neighbours(comm, nmesh)
    if nxt is None:
        return np.zeros((1,) + slab.shape[1:], slab.dtype)
    if nxt == comm.rank:
        return np.concatenate([slab, slab[:1]], axis=0)
    recv = np.empty(slab.shape[1:], slab.dtype)
    comm.Sendrecv(np.ascontiguousarray(slab[0]), dest=prv, sendtag=72, recvbuf=recv, source=nxt, recvtag=72)
    return np.concatenate([slab, recv[None]], axis=0)


def paint(comm, pos: np.ndarray, weight: np.ndarray | float | None, nmesh: int, box: float,
          method: str = "cic", routed: bool = False, dtype=np.float64, check: bool = True) -> np.ndarray:
    """Paint particles at ``pos`` (Mpc/h) with ``weight`` onto the local slab of an ``nmesh``^3 grid.

    Returns the local slab ``(stop - start, nmesh, nmesh)`` holding the summed weights (not yet an
    overdensity). ``routed=True`` says the particles already sit on the owner of their cell plane
    (see :func:`route_to_slabs`); otherwise they are routed here. Collective.
    """
    if method not in METHODS:
        raise ValueError(f"unknown paint method {method!r}; choose one of {METHODS}")
    pos = np.asarray(pos)
    n = len(pos)
    if weight is None:
        weight = np.ones(n)
    weight = np.broadcast_to(np.asarray(weight, dtype=np.float64), (n,))
    if not routed:
        got = route_to_slabs(comm, pos, {"weight": np.ascontiguousarray(weight)}, nmesh, box, what="paint")
        pos, weight = got["pos"], got["weight"]
    start, stop = slab_bounds(nmesh, comm.size, comm.rank)
    u = grid_coordinates(pos, nmesh, box)
    if len(u):
        planes = np.floor(u[:, 0]).astype(np.int64)
        if planes.min() < start or planes.max() >= stop:
            raise ValueError("paint: particles outside this rank's slab; route them first")
    grid = np.zeros((stop - start + 1, nmesh, nmesh), dtype=dtype)
    w = np.ascontiguousarray(weight, dtype=np.float64)
    if method == "cic":
        _paint_cic_kernel(grid, u, w, start)
        local = _add_ghost_plane(comm, grid, nmesh)
    else:
        _paint_ngp_kernel(grid, u, w, start)
        local = grid[:-1]
    if check:
        check_sum(comm, float(w.sum()), float(local.sum(dtype=np.float64)), f"{method} paint", rtol=1e-5)
    return local


def readout_cic(comm, slab: np.ndarray, pos: np.ndarray, box: float) -> np.ndarray:
    """CIC interpolation of the slab field at ``pos`` (particles already on their slab owner)."""
    nmesh = slab.shape[1]
    start, _ = slab_bounds(nmesh, comm.size, comm.rank)
    ext = _fetch_ghost_plane(comm, slab, nmesh)
    u = grid_coordinates(pos, nmesh, box)
    out = np.empty(len(u), dtype=np.float64)
    _readout_cic_kernel(np.ascontiguousarray(ext, dtype=np.float64), u, start, out)
    return out


def readout_index(slab: np.ndarray, start: int, index: np.ndarray) -> np.ndarray:
    """Nearest-grid-point readout: the values at integer grid indices ``index`` (n, 3), whose first
    component lies in this rank's slab ``[start, start + len(slab))``."""
    index = np.asarray(index, dtype=np.int64)
    if len(index) and (index[:, 0].min() < start or index[:, 0].max() >= start + slab.shape[0]):
        raise ValueError("readout_index: grid index outside this rank's slab; route the particles first")
    return slab[index[:, 0] - start, index[:, 1], index[:, 2]]


def cic_numpy_reference(pos: np.ndarray, weight: np.ndarray, nmesh: int, box: float) -> np.ndarray:
    """Plain vectorised numpy CIC of a whole periodic grid on one rank (``np.bincount``); the
    reference for tests and the benchmark baseline."""
    u = grid_coordinates(pos, nmesh, box)
    i0 = np.floor(u).astype(np.int64)
    d = u - i0
    grid = np.zeros(nmesh**3)
    for a in (0, 1):
        wx = d[:, 0] if a else 1 - d[:, 0]
        for b in (0, 1):
            wy = d[:, 1] if b else 1 - d[:, 1]
            for c in (0, 1):
                wz = d[:, 2] if c else 1 - d[:, 2]
                idx = (((i0[:, 0] + a) % nmesh) * nmesh + (i0[:, 1] + b) % nmesh) * nmesh + (i0[:, 2] + c) % nmesh
                grid += np.bincount(idx, weights=weight * wx * wy * wz, minlength=nmesh**3)
    return grid.reshape(nmesh, nmesh, nmesh)

