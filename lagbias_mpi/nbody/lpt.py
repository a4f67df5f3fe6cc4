"""The particle lattice and its second-order Lagrangian perturbation theory (2LPT) displacement.

Lattice point q (integers in [0, ppd)) sits at -box/2 + q box/ppd, on IC grid point q N_ic/ppd
(N_ic a multiple of ppd). A rank creates the particles whose IC grid plane lies in its IC slab, so
the displacement fields computed on the IC grid are read locally (nearest grid point = exact).

With delta_k the linear field at a_ic (Scoccimarro 1998; FastPM):
    psi1_k = i k / k^2 delta_k,            x = q + psi1 + psi2
    psi2_k = (D2/D1^2) (-i k / k^2) S_k,    S = sum_{i<j} (phi_ii phi_jj - phi_ij^2), phi_ij_k = k_i k_j/k^2 delta_k
    p = a^2 E(a) (f1 psi1 + f2 psi2)       (p = a^2 dx/dt in units of H0, Mpc/h)
Modes with any |k_i| >= the particle Nyquist pi ppd / box are removed from the displacement source
(the IC grid resolves scales the lattice cannot carry; aliasing them would add spurious power).
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.mesh.paint import readout_index
from lagbias_mpi.mpi.fft import SlabFFT, tidal_kernel


def lattice_for_slab(ppd: int, n_ic: int, start: int, stop: int) -> np.ndarray:
    """Lagrangian indices (n, 3) int32 of the lattice points whose IC grid plane is in [start, stop)."""
    if n_ic % ppd:
        raise ValueError(f"N_ic = {n_ic} is not a multiple of ppd = {ppd}")
    ratio = n_ic // ppd
    qx = np.arange(-(-start // ratio), -(-stop // ratio), dtype=np.int32)
    q = np.arange(ppd, dtype=np.int32)
    grid = np.stack(np.meshgrid(qx, q, q, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3)


def lattice_position(lagr_index: np.ndarray, ppd: int, box: float) -> np.ndarray:
    """Comoving position (n, 3) float64 in Mpc/h of lattice points."""
    return -0.5 * box + lagr_index.astype(np.float64) * (box / ppd)


def _lattice_filter(fft: SlabFFT, ppd: int) -> np.ndarray:
    """1 for modes with every |k_i| below the particle Nyquist wavenumber, else 0."""
    k_nyq = np.pi * ppd / fft.box
    keep = np.ones(fft.complex_shape, dtype=bool)
    for k in fft.local_k():
        keep &= np.abs(k.astype(np.float64)) < k_nyq * (1 - 1e-9)
    return keep


def _gradient_readout(fft: SlabFFT, potential_k: np.ndarray, index: np.ndarray) -> np.ndarray:
    """-grad of the potential, i.e. IFFT[-i k phi_k], read at IC grid indices (n, 3)."""
    out = np.empty((len(index), 3), dtype=np.float64)
    for axis, k in enumerate(fft.local_k()):
        field = fft.backward(np.asarray(-1j, fft.cdtype) * (k * potential_k))
        out[:, axis] = readout_index(field, fft.real_start, index)
    return out


def lpt_displacements(fft: SlabFFT, delta_k: np.ndarray, lagr_index: np.ndarray,
                      ppd: int) -> tuple[np.ndarray, np.ndarray]:
    """(psi1, psi2_unit) in Mpc/h at the local lattice points, from the local Fourier slab of the
    linear field at a_ic. psi2_unit is the second-order displacement for D2/D1^2 = 1: multiply it by
    ``Cosmology.d2_factor(a_ic)`` (about -3/7)."""
    index = (lagr_index.astype(np.int64) * (fft.n // ppd)) % fft.n
    k2 = fft.local_k2().astype(np.float64)
    delta_k = (delta_k * _lattice_filter(fft, ppd)).astype(fft.cdtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_k2 = np.where(k2 > 0, 1.0 / np.where(k2 > 0, k2, 1.0), 0.0).astype(fft.dtype)
    # phi1_k = -delta_k / k^2; psi1 = -grad phi1
    psi1 = _gradient_readout(fft, -delta_k * inv_k2, index)
    diag = [fft.backward(tidal_kernel(fft, i, i) * delta_k) for i in range(3)]
    source = diag[0] * diag[1] + diag[0] * diag[2] + diag[1] * diag[2]
    del diag
    for i, j in ((0, 1), (0, 2), (1, 2)):
        source -= fft.backward(tidal_kernel(fft, i, j) * delta_k) ** 2
    source_k = fft.forward(source) * _lattice_filter(fft, ppd).astype(fft.dtype)
    # phi2_k = -S_k / k^2; psi2 (for D2/D1^2 = 1) = +grad phi2 = -(-grad phi2)
    psi2 = -_gradient_readout(fft, -source_k * inv_k2, index)
    return psi1, psi2
