"""Gaussian initial conditions that do not depend on the number of ranks.

White noise is drawn in real space by GLOBAL cell index: two uniforms per cell from a splitmix64
hash of (seed, flat index), turned into one unit Gaussian by Box-Muller. Its distributed FFT is
multiplied by sqrt(P(k) N^3 / V) (so that P = V/N^6 <|delta_k|^2> equals the input spectrum) with the
k = 0 mode set to zero. The field is real by construction (Hermitian symmetry holds automatically),
and 1, 2 or 3 ranks give the same field up to FFT rounding. Element [0,0,0] sits at -box/2.
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.core.hashing import splitmix64
from lagbias_mpi.mpi.fft import SlabFFT


def uniforms(seed: int, index: np.ndarray, stream: int) -> np.ndarray:
    """Uniform numbers in (0, 1) keyed by (seed, stream, global index); pure function."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.array([(seed * 4 + stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        bits = splitmix64(np.asarray(index, dtype=np.uint64) ^ key) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * (1.0 / 2.0**53)


def white_noise(seed: int, n: int, start: int, stop: int) -> np.ndarray:
    """Unit Gaussian white noise of planes [start, stop) of an n^3 grid, keyed by global index."""
    out = np.empty((stop - start, n, n), dtype=np.float64)
    for plane in range(start, stop):  # plane by plane: bounded temporary memory
        idx = np.arange(plane * n * n, (plane + 1) * n * n, dtype=np.uint64)
        u1, u2 = uniforms(seed, idx, 0), uniforms(seed, idx, 1)
        out[plane - start] = (np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)).reshape(n, n)
    return out


def gaussian_field_k(fft: SlabFFT, power, seed: int) -> np.ndarray:
    """Local Fourier slab (unnormalised DFT) of a Gaussian field with power spectrum ``power(k)``
    [(Mpc/h)^3, k in h/Mpc], drawn from ``seed``."""
    noise = white_noise(seed, fft.n, fft.real_start, fft.real_stop)
    noise_k = fft.forward(noise)
    k = np.sqrt(fft.local_k2().astype(np.float64))
    amp = np.sqrt(power(k) * fft.n**3 / fft.box**3)
    amp = np.where(k > 0, amp, 0.0).astype(fft.dtype)
    return noise_k * amp


def gaussian_field(fft: SlabFFT, power, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(real slab, Fourier slab) of the Gaussian field of :func:`gaussian_field_k`."""
    delta_k = gaussian_field_k(fft, power, seed)
    return fft.backward(delta_k), delta_k
