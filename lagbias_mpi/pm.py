"""Distributed particle-mesh gravity with the FastPM kick-drift-kick integrator.

Units: positions in Mpc/h (wrapped into [-box/2, box/2)), time in 1/H0, momentum p = a^2 dx/dt
(so the peculiar velocity is 100 p / a km/s). Equations: dx/da = p / (a^3 E), dp/da = F / (a^2 E),
F = -grad phi with nabla^2 phi = (3/2) Omega_m delta. The kick and drift factors are FastPM's
growth-matched ones (Feng et al. 2016, :meth:`Cosmology.kick_factor`), which make the linear
growth exact for any step size.

Force: particles sit on the owner of their force-mesh plane (re-routed before every force);
CIC paint, distributed r2c FFT, phi_k = -(3/2) Omega_m delta_k / k^2 with the CIC window divided out
once, F_k = -i k phi_k (exact gradient; the Nyquist component of k set to 0), three c2r FFTs and
CIC readout. Paint and readout use the same kernel, so the total momentum is conserved.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from .cosmology import Cosmology
from .fft import SlabFFT
from .logs import Progress, get_logger
from numba import njit

from .layout import slab_bounds
from .paint import _fetch_ghost_plane, grid_coordinates, paint, route_to_slabs
from .parallel import ConsistencyError

log = get_logger("pm")


@dataclass
class Particles:
    """This rank's particles: position (Mpc/h), momentum (p = a^2 dx/dt, H0 units), lattice index."""

    pos: np.ndarray  # (n, 3) float64
    mom: np.ndarray  # (n, 3) float64
    lagr: np.ndarray  # (n, 3) int32
    extra: dict = field(default_factory=dict)  # further per-particle columns carried along

    def __len__(self) -> int:
        return len(self.pos)


def wrap(pos: np.ndarray, box: float) -> np.ndarray:
    """Periodic wrap into [-box/2, box/2)."""
    out = np.mod(pos + 0.5 * box, box) - 0.5 * box
    out[out >= 0.5 * box] = -0.5 * box
    return out


def route(comm, parts: Particles, nmesh: int, box: float) -> Particles:
    """Send particles to the owner of their ``nmesh`` plane (one packed Alltoallv)."""
    cols = {"mom": parts.mom, "lagr": parts.lagr}
    cols.update({f"x_{k}": v for k, v in parts.extra.items()})
    got = route_to_slabs(comm, parts.pos, cols, nmesh, box, what="PM particles")
    extra = {k[2:]: v for k, v in got.items() if k.startswith("x_")}
    return Particles(got["pos"], got["mom"], got["lagr"], extra)


def _cic_window(fft: SlabFFT) -> np.ndarray:
    w = np.ones(fft.complex_shape)
    for k in fft.local_k():
        w = w * np.sinc(k.astype(np.float64) * fft.cell / (2 * np.pi)) ** 2
    return w


class ForceMesh:
    """The force computation on an ``nmesh``^3 mesh (FFT plans and kernels built once)."""

    def __init__(self, comm, nmesh: int, box: float, omega_m: float, n_total: int, dtype=np.float32):
        self.comm, self.nmesh, self.box = comm, int(nmesh), float(box)
        self.fft = SlabFFT(comm, self.nmesh, self.box, dtype=dtype)
        self.n_total = int(n_total)
        k2 = self.fft.local_k2().astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            green = np.where(k2 > 0, 1.5 * omega_m / np.where(k2 > 0, k2, 1.0), 0.0)
        # F_k = -i k phi_k = i k (3/2) Om delta_k / k^2; CIC window divided out once
        self._kernel = green.astype(self.fft.dtype)
        h = self.fft.cell
        # FastPM's 4-point finite-difference gradient: ~ k at low k, 0 at the Nyquist wavenumber, and
        # small near it, which suppresses the force of the lattice pattern aliased there
        self._k = [((8 * np.sin(k.astype(np.float64) * h) - np.sin(2 * k.astype(np.float64) * h)) / (6 * h))
                   .astype(self.fft.dtype) for k in self.fft.local_k()]

    def force(self, pos: np.ndarray) -> np.ndarray:
        """Force F = -grad phi (n, 3) at ``pos``; the particles must sit on their plane's owner."""
        mass = paint(self.comm, pos, None, self.nmesh, self.box, method="cic", routed=True)
        delta = (mass * (self.nmesh**3 / self.n_total) - 1.0).astype(self.fft.dtype)
        delta_k = self.fft.forward(delta) * self._kernel
        ik = np.asarray(1j, dtype=self.fft.cdtype)
        comps = [_fetch_ghost_plane(self.comm, self.fft.backward(ik * (k * delta_k)), self.nmesh)
                 for k in self._k]
        out = np.empty((len(pos), 3), dtype=np.float64)
        start, _ = slab_bounds(self.nmesh, self.comm.size, self.comm.rank)
        _readout_cic3(*comps, grid_coordinates(pos, self.nmesh, self.box), start, out)
        return out


@njit(cache=True)
def _readout_cic3(gx, gy, gz, u, start, out):
    """CIC interpolation of three fields (planes [start, ...) incl. one ghost plane) at grid
    coordinates ``u``; the same kernel as :func:`lagbias_mpi.paint.readout_cic`, fused."""
    nx, ny, nz = gx.shape
    for p in range(u.shape[0]):
        fx, fy, fz = np.floor(u[p, 0]), np.floor(u[p, 1]), np.floor(u[p, 2])
        dx, dy, dz = u[p, 0] - fx, u[p, 1] - fy, u[p, 2] - fz
        ix = int(fx) - start
        iy = int(fy) % ny
        iz = int(fz) % nz
        iy1 = (iy + 1) % ny
        iz1 = (iz + 1) % nz
        ax = 0.0
        ay = 0.0
        az = 0.0
        for a in range(2):
            wa = dx if a else 1.0 - dx
            x = ix + a
            w00 = wa * (1.0 - dy) * (1.0 - dz)
            w01 = wa * (1.0 - dy) * dz
            w10 = wa * dy * (1.0 - dz)
            w11 = wa * dy * dz
            ax += w00 * gx[x, iy, iz] + w01 * gx[x, iy, iz1] + w10 * gx[x, iy1, iz] + w11 * gx[x, iy1, iz1]
            ay += w00 * gy[x, iy, iz] + w01 * gy[x, iy, iz1] + w10 * gy[x, iy1, iz] + w11 * gy[x, iy1, iz1]
            az += w00 * gz[x, iy, iz] + w01 * gz[x, iy, iz1] + w10 * gz[x, iy1, iz] + w11 * gz[x, iy1, iz1]
        out[p, 0] = ax
        out[p, 1] = ay
        out[p, 2] = az


def a_steps(a_start: float, a_end: float, n_steps: int) -> np.ndarray:
    """Step boundaries, linear in a."""
    if n_steps < 1:
        raise ValueError(f"need at least one PM step, got {n_steps}")
    return np.linspace(a_start, a_end, n_steps + 1)


def evolve(comm, parts: Particles, cosmo: Cosmology, box: float, nmesh: int, a_start: float,
           a_end: float, n_steps: int, n_total: int) -> tuple[Particles, dict]:
    """Kick-drift-kick from ``a_start`` to ``a_end`` in ``n_steps`` steps linear in a.

    Returns the particles (on the owner of their force-mesh plane) and diagnostics:
    ``pm_step_s`` (mean wall seconds per step), ``momentum`` (global |sum p| / sum |p| at the end).
    """
    mesh = ForceMesh(comm, nmesh, box, cosmo.omega_m, n_total)
    parts = route(comm, parts, nmesh, box)
    force = mesh.force(parts.pos)
    steps = a_steps(a_start, a_end, n_steps)
    prog = Progress(comm, n_steps, "PM steps", logger=log)
    t0 = time.perf_counter()
    for i in range(n_steps):
        a0, a1 = float(steps[i]), float(steps[i + 1])
        ah = 0.5 * (a0 + a1)
        parts.mom += force * cosmo.kick_factor(a0, ah, a0)
        parts.pos = wrap(parts.pos + parts.mom * cosmo.drift_factor(a0, a1, ah), box)
        parts = route(comm, parts, nmesh, box)
        force = mesh.force(parts.pos)
        parts.mom += force * cosmo.kick_factor(ah, a1, a1)
        prog.update(i + 1, f"a={a1:.4f}")
    elapsed = time.perf_counter() - t0
    n_now = comm.allreduce(len(parts))
    if n_now != n_total:
        raise ConsistencyError(f"PM: particle count changed from {n_total} to {n_now}")
    total = np.empty(3)
    comm.Allreduce(parts.mom.sum(axis=0), total)
    norm = comm.allreduce(float(np.abs(parts.mom).sum()))
    diag = {"pm_step_s": comm.allreduce(elapsed, op=MPI.MAX) / n_steps,
            "momentum": float(np.linalg.norm(total) / max(norm, 1e-300))}
    return parts, diag
