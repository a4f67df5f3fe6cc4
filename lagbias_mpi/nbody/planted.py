"""The planted truth: particle weights f_true = exp(b1 nu + b2 nu^2 + c_lap lambda) / mean, a known f for exact tests of training.
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.config.simulate import PlantedConfig
from lagbias_mpi.mesh.paint import readout_index
from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.mpi.fft import SlabFFT, gaussian_window


def _standardised(comm, slab: np.ndarray) -> np.ndarray:
    n = comm.allreduce(slab.size)
    mean = float(global_sum(comm, slab.sum(dtype=np.float64))) / n
    var = float(global_sum(comm, ((slab - mean) ** 2).sum(dtype=np.float64))) / n
    return (slab - mean) / np.sqrt(var)


def planted_weights(comm, fft_ic: SlabFFT, ic_delta: np.ndarray, lagr: np.ndarray, ppd: int,
                    pc: PlantedConfig) -> np.ndarray:
    """f_true of the local particles (on their Lagrangian IC slab), NOT yet normalised to mean 1.
    Computed from the stored float32 IC field, exactly as the trainer reads it."""
    delta_k = fft_ic.forward(ic_delta)
    k2 = fft_ic.local_k2()
    wk = delta_k * gaussian_window(k2, pc.radius).astype(fft_ic.dtype)
    nu = _standardised(comm, fft_ic.backward(wk))
    lam = _standardised(comm, fft_ic.backward(-k2 * wk))
    n_ic = fft_ic.n
    idx = np.rint(lagr.astype(np.float64) * n_ic / ppd).astype(np.int64) % n_ic
    v, l_ = readout_index(nu, fft_ic.real_start, idx), readout_index(lam, fft_ic.real_start, idx)
    return np.exp(pc.b1 * v + pc.b2 * v**2 + pc.c_lap * l_)
