"""The planted truth: particle weights f_true = exp(b1 nu + b2 nu^2 + c_lap lambda) / mean, a known f for exact tests of training.
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.config.simulate import PlantedConfig
from lagbias_mpi.mesh.grid import ic_index
from lagbias_mpi.mesh.paint import readout_index
from lagbias_mpi.mpi.comm import global_moments
from lagbias_mpi.mpi.fft import SlabFFT, gaussian_window


def _standardised(comm, slab: np.ndarray, moments=None) -> tuple[np.ndarray, tuple[float, float]]:
    """``slab`` in units of its global standard deviation about its global mean (the arithmetic of
    the files written so far: the mean subtracted in the slab's dtype, the division in float64), or
    of the given (mean, std); returns it with the (mean, std) used."""
    if moments is None:
        mean, std = global_moments(comm, slab.reshape(-1, 1))
        moments = (float(mean[0]), float(std[0]))
    return (slab - moments[0]) / np.float64(moments[1]), moments


def planted_weights(comm, fft_ic: SlabFFT, ic_delta: np.ndarray, lagr: np.ndarray, ppd: int,
                    pc: PlantedConfig, moments=None, return_moments: bool = False):
    """f_true of the local particles (on their Lagrangian IC slab), NOT yet normalised to mean 1.
    Computed from the stored float32 IC field, exactly as the trainer reads it. nu and lambda are
    standardised with this box's own moments, or with ``moments`` = ((mean, std) of nu, of lambda),
    e.g. another box's, which makes f_true the same function of delta_R and its Laplacian in both
    (``return_moments``: also return the moments used)."""
    delta_k = fft_ic.forward(ic_delta)
    k2 = fft_ic.local_k2()
    wk = delta_k * gaussian_window(k2, pc.radius).astype(fft_ic.dtype)
    given = moments if moments is not None else (None, None)
    (nu, m_nu), (lam, m_lam) = (_standardised(comm, fft_ic.backward(x), m) for x, m in zip((wk, -k2 * wk), given))
    idx = ic_index(lagr, ppd, fft_ic.n)
    v, l_ = readout_index(nu, fft_ic.real_start, idx), readout_index(lam, fft_ic.real_start, idx)
    f = np.exp(pc.b1 * v + pc.b2 * v**2 + pc.c_lap * l_)
    return (f, (m_nu, m_lam)) if return_moments else f
