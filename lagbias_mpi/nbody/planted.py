"""The planted truth: particle weights f_true = exp(b1 nu + b2 nu^2 + c_lap lambda) / mean, a known f for exact tests of training.
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.config.simulate import PlantedConfig
from lagbias_mpi.mesh.grid import ic_index
from lagbias_mpi.mesh.paint import readout_index
from lagbias_mpi.mpi.comm import global_moments
from lagbias_mpi.mpi.fft import SlabFFT, gaussian_window


def _standardised(comm, slab: np.ndarray) -> np.ndarray:
    """``slab`` in units of its global standard deviation about its global mean (the arithmetic of
    the files written so far: the mean subtracted in the slab's dtype, the division in float64)."""
    mean, std = global_moments(comm, slab.reshape(-1, 1))
    return (slab - float(mean[0])) / np.float64(std[0])


def planted_weights(comm, fft_ic: SlabFFT, ic_delta: np.ndarray, lagr: np.ndarray, ppd: int,
                    pc: PlantedConfig) -> np.ndarray:
    """f_true of the local particles (on their Lagrangian IC slab), NOT yet normalised to mean 1.
    Computed from the stored float32 IC field, exactly as the trainer reads it."""
    delta_k = fft_ic.forward(ic_delta)
    k2 = fft_ic.local_k2()
    wk = delta_k * gaussian_window(k2, pc.radius).astype(fft_ic.dtype)
    nu, lam = (_standardised(comm, fft_ic.backward(x)) for x in (wk, -k2 * wk))
    idx = ic_index(lagr, ppd, fft_ic.n)
    v, l_ = readout_index(nu, fft_ic.real_start, idx), readout_index(lam, fft_ic.real_start, idx)
    return np.exp(pc.b1 * v + pc.b2 * v**2 + pc.c_lap * l_)
