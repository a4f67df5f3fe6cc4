"""Multi-scale features of the smoothed initial density (paper section 2, DESIGN.md section 1).

For each Gaussian smoothing scale R (Mpc/h) and each feature kind:

- ``delta``: delta_R = IFFT[W delta_k]
- ``lap``  : Laplacian of delta_R = IFFT[-k^2 W delta_k]
- ``g2``   : G2 = sum_ij (IFFT[k_i k_j / k^2 W delta_k])^2 - delta_R^2
- ``s2``   : s^2 = sum_ij (IFFT[(k_i k_j / k^2 - delta_ij / 3) W delta_k])^2

computed on this rank's slab with the distributed FFT (collective). Raw features are in units of
the density contrast (lap in (h/Mpc)^2); :func:`column_moments` gives each column's global mean and std
over all IC grid points of all ranks, with which the pipeline standardises the particles' values
(:func:`lagbias_mpi.bias.particles.featurised_particles`).
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.config.features import KINDS
from lagbias_mpi.mpi.comm import global_moments
from lagbias_mpi.mpi.fft import SlabFFT, gaussian_window, laplacian_kernel, tidal_kernel


def check_scales(scales, box: float, n_ic: int) -> None:
    """Refuse a smoothing scale below the IC grid spacing box / n_ic."""
    cell = box / n_ic
    bad = [r for r in scales if r < cell * (1 - 1e-9)]
    if bad:
        raise ValueError(f"smoothing scale(s) {bad} Mpc/h below the IC grid spacing {cell:.4g} Mpc/h "
                         f"(box {box} / n_ic {n_ic})")


def feature_names(scales, kinds) -> list[str]:
    """Column names, scale-major: ``delta_R1.00, lap_R1.00, g2_R1.00, delta_R2.83, ...``."""
    return [f"{kind}_R{r:.2f}" for r in scales for kind in kinds]


def _tidal_sq_sum(fft: SlabFFT, wdk: np.ndarray, traceless: bool) -> np.ndarray:
    """sum_ij (IFFT[(k_i k_j/k^2 [- delta_ij/3]) W delta_k])^2 on the local real slab (float64);
    one kernel and one transform alive at a time, squares accumulated in place."""
    out = np.zeros(fft.real_shape, dtype=np.float64)
    for i in range(3):
        for j in range(i, 3):
            kern = tidal_kernel(fft, i, j)
            if traceless and i == j:
                kern -= np.float32(1.0 / 3.0)
            kern = np.multiply(kern, wdk)  # complex: the kernel's real array is freed here
            t = fft.backward(kern)
            del kern
            t = t.astype(np.float64, copy=False)
            np.multiply(t, t, out=t)
            if i != j:
                t *= 2.0
            out += t
            del t
    return out


def feature_columns(comm, ic_slab: np.ndarray, box: float, scales, kinds, dtype=np.float64):
    """The raw feature columns on this rank's IC slab, one at a time: yields slabs of shape
    ``(planes, n, n)`` (the FFT's ``dtype``, float64 for G2/s2), in the
    order of :func:`feature_names`. Only one column, the Fourier slab of delta and that of the
    current scale are alive together: a caller that reads a column out and drops it holds no
    ``(planes, n, n, n_features)`` array. Collective (every rank iterates to the end)."""
    n = ic_slab.shape[1]
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown feature {kind!r}; choose from {KINDS}")
    fft = SlabFFT(comm, n, box, dtype=dtype)
    dk = fft.forward(np.asarray(ic_slab, dtype=dtype))
    del ic_slab  # the caller's reference is the only one left
    k2 = fft.local_k2()
    dk[k2 == 0] = 0  # the field's mean: g2 and s2 would pick up terms in it through delta_R
    for r in scales:
        wdk = dk * gaussian_window(k2, r).astype(fft.dtype)
        delta_r = fft.backward(wdk) if ("g2" in kinds or "delta" in kinds) else None
        for kind in kinds:
            if kind == "delta":
                val = delta_r
            elif kind == "lap":
                val = fft.backward(wdk * laplacian_kernel(k2))
            elif kind == "g2":
                val = _tidal_sq_sum(fft, wdk, traceless=False)
                val -= delta_r.astype(np.float64) ** 2
            else:
                val = _tidal_sq_sum(fft, wdk, traceless=True)
            yield val
            del val
        del wdk, delta_r


def compute_features(comm, ic_slab: np.ndarray, box: float, scales, kinds,
                     dtype=np.float64, out_dtype=np.float32) -> np.ndarray:
    """Raw features on this rank's IC slab: array ``(planes, n, n, len(scales) * len(kinds))`` of
    ``out_dtype``, columns ordered as :func:`feature_names`; FFTs in ``dtype``. Collective.
    The pipeline reads :func:`feature_columns` out at the particles instead (no such array)."""
    out = None
    for col, val in enumerate(feature_columns(comm, ic_slab, box, scales, kinds, dtype)):
        if out is None:
            out = np.empty(val.shape + (len(scales) * len(kinds),), dtype=out_dtype)
        out[..., col] = val
    return out


def column_moments(comm, column: np.ndarray) -> tuple[float, float]:
    """Global mean and standard deviation of one feature column over all IC grid points
    (float64 sums; collective)."""
    mean, std = global_moments(comm, column.reshape(-1, 1))
    return float(mean[0]), float(std[0])
