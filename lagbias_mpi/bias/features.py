"""Multi-scale features of the smoothed initial density (paper section 2, DESIGN.md section 1).

For each Gaussian smoothing scale R (Mpc/h) and each feature kind:

- ``delta``: delta_R = IFFT[W delta_k]
- ``lap``  : Laplacian of delta_R = IFFT[-k^2 W delta_k]
- ``g2``   : G2 = sum_ij (IFFT[k_i k_j / k^2 W delta_k])^2 - delta_R^2
- ``s2``   : s^2 = sum_ij (IFFT[(k_i k_j / k^2 - delta_ij / 3) W delta_k])^2

computed on this rank's slab with the distributed FFT (collective). Raw features are in units of
the density contrast (lap in (h/Mpc)^2); :func:`standardise` turns each into global mean 0, std 1
with moments over all IC grid points of all ranks.
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.config.features import KINDS
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
    """sum_ij (IFFT[(k_i k_j/k^2 [- delta_ij/3]) W delta_k])^2 on the local real slab."""
    out = np.zeros(fft.real_shape, dtype=np.float64)
    for i in range(3):
        for j in range(i, 3):
            kern = tidal_kernel(fft, i, j)
            if traceless and i == j:
                kern = kern - np.float32(1.0 / 3.0)
            t = fft.backward(wdk * kern).astype(np.float64)
            out += (1.0 if i == j else 2.0) * t * t
    return out


def compute_features(comm, ic_slab: np.ndarray, box: float, scales, kinds,
                     dtype=np.float64, out_dtype=np.float32) -> np.ndarray:
    """Raw features on this rank's IC slab: array ``(planes, n, n, len(scales) * len(kinds))`` of
    ``out_dtype``, columns ordered as :func:`feature_names`; FFTs in ``dtype``. Collective."""
    n = ic_slab.shape[1]
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown feature {kind!r}; choose from {KINDS}")
    fft = SlabFFT(comm, n, box, dtype=dtype)
    dk = fft.forward(np.asarray(ic_slab, dtype=dtype))
    k2 = fft.local_k2()
    dk[k2 == 0] = 0  # the field's mean: g2 and s2 would pick up terms in it through delta_R
    out = np.empty(fft.real_shape + (len(scales) * len(kinds),), dtype=out_dtype)
    col = 0
    for r in scales:
        wdk = dk * gaussian_window(k2, r).astype(fft.dtype)
        delta_r = None
        for kind in kinds:
            if kind in ("delta", "g2"):
                delta_r = fft.backward(wdk) if delta_r is None else delta_r
            if kind == "delta":
                val = delta_r
            elif kind == "lap":
                val = fft.backward(wdk * laplacian_kernel(k2))
            elif kind == "g2":
                val = _tidal_sq_sum(fft, wdk, traceless=False) - delta_r.astype(np.float64) ** 2
            else:
                val = _tidal_sq_sum(fft, wdk, traceless=True)
            out[..., col] = val
            col += 1
    return out


def standardise(feats: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(feats - mean) / std, column by column (any leading shape)."""
    out = np.empty_like(feats)
    for c in range(feats.shape[-1]):  # one column at a time: float64 temporaries of one column only
        out[..., c] = (feats[..., c] - np.float64(mean[c])) / np.float64(std[c])
    return out
