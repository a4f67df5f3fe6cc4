"""Distributed real FFT of an N^3 slab-decomposed field, and the Fourier kernels built on it.

Real space: the field is cut along axis 0 into the slabs of :mod:`lagbias_mpi.mpi.layout`.
Fourier space: the half-complex array of shape (N, N, N//2+1) is cut along axis 1 (the layout of
a transposed slab FFT); ``SlabFFT.local_k`` gives the k-vectors of the local Fourier slab.

Conventions: ``forward`` is the unnormalised DFT (numpy's ``rfftn``), ``backward`` its inverse
including the 1/N^3 (numpy's ``irfftn``). Wavenumbers are in h/Mpc for a box in Mpc/h.

Backends sit behind :class:`FFTBackend`: ``mpi4py-fft`` (default, FFTW) and ``pfft``
(pfft-python, :mod:`lagbias_mpi.mpi.fft_pfft`; ``make pfft`` installs it), both on slabs with the
same real and Fourier layouts. ``SlabFFT(..., backend=None)`` (what every stage uses) takes the
backend from ``$LAGBIAS_FFT_BACKEND`` (default ``mpi4py-fft``), so one variable switches features,
paint/power, ICs and PM of a whole job; set it identically on every rank (mpirun passes it on).
What PFFT's pencils (a 2-D process mesh, for grids with fewer planes than ranks) would take is
written in :mod:`lagbias_mpi.mpi.fft_pfft`.

Reproducibility: FFTW's planner effort comes from ``$LAGBIAS_FFTW_PLANNER`` (default
``FFTW_MEASURE``, as mpi4py-fft). FFTW_MEASURE times candidate algorithms, so two runs of the same
job can pick different plans and differ at the rounding level (measured here: 1 run in 4-12 at 96^3),
which the particle-mesh steps of the built-in simulation amplify into a halo more or less.
``FFTW_ESTIMATE`` picks plans by a fixed heuristic: bitwise identical runs (12 of 12), but ~4x slower
transforms at 256^3 on this machine. (Saving FFTW wisdom would give both, but mpi4py-fft 2.0.6 fails
to import the wisdom it exports here.)
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.mpi.fft_backends import _Mpi4pyFFTBackend, backend_name
from lagbias_mpi.mpi.layout import slab_bounds


class SlabFFT:
    """Distributed real FFT of an ``n``^3 grid over ``comm`` for a periodic box of ``box`` Mpc/h,
    with ``backend`` (default: :func:`backend_name`, i.e. ``$LAGBIAS_FFT_BACKEND`` or mpi4py-fft).

    Attributes: ``real_shape``/``real_start`` (local real slab, planes along axis 0),
    ``complex_shape`` (local Fourier slab, cut along axis 1), ``backend`` (name and version).
    """

    def __init__(self, comm, n: int, box: float, dtype=np.float32, backend: str | None = None):
        if n < 2:
            raise ValueError(f"FFT grid must have at least 2 cells per side, got {n}")
        if comm.size > n:
            raise ValueError(f"FFT of {n}^3 cannot be cut into slabs over {comm.size} ranks (ranks > N)")
        backend = backend_name(backend)
        self.comm, self.n, self.box = comm, int(n), float(box)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"FFT dtype must be float32 or float64, got {self.dtype}")
        self.cdtype = np.result_type(self.dtype, np.complex64)
        if backend == "pfft":
            from lagbias_mpi.mpi.fft_pfft import PfftBackend

            self._backend = PfftBackend(comm, self.n, self.dtype)
        else:
            self._backend = _Mpi4pyFFTBackend(comm, self.n, self.dtype)
        start, stop = slab_bounds(self.n, comm.size, comm.rank)
        if (self._backend.real_slab[0].start, self._backend.real_slab[0].stop) != (start, stop):
            raise RuntimeError("FFT backend slab layout differs from lagbias_mpi.mpi.layout")
        self.real_start, self.real_stop = start, stop
        self.real_shape = (stop - start, self.n, self.n)
        self.complex_shape = tuple(s.stop - s.start for s in self._backend.complex_slab)
        self.complex_slab = self._backend.complex_slab

    @property
    def backend(self) -> dict:
        return {"name": self._backend.name, "version": self._backend.version}

    @property
    def cell(self) -> float:
        """Cell size in Mpc/h."""
        return self.box / self.n

    @property
    def kf(self) -> float:
        """Fundamental wavenumber 2 pi / box in h/Mpc."""
        return 2 * np.pi / self.box

    def forward(self, real: np.ndarray) -> np.ndarray:
        """Unnormalised r2c DFT of the local real slab; returns the local Fourier slab."""
        if real.shape != self.real_shape:
            raise ValueError(f"real slab has shape {real.shape}, expected {self.real_shape}")
        return self._backend.forward(real.astype(self.dtype, copy=False))

    def backward(self, cplx: np.ndarray) -> np.ndarray:
        """Inverse (c2r, with 1/N^3) of :meth:`forward`; returns the local real slab."""
        if cplx.shape != self.complex_shape:
            raise ValueError(f"Fourier slab has shape {cplx.shape}, expected {self.complex_shape}")
        return self._backend.backward(cplx.astype(self.cdtype, copy=False))

    def local_k(self, dtype=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (kx, ky, kz) of the local Fourier slab in h/Mpc (``dtype``, default that
        of the field)."""
        n = self.n
        dtype = self.dtype if dtype is None else dtype
        k_full = (np.fft.fftfreq(n, d=1.0 / n) * self.kf).astype(dtype)
        k_half = (np.arange(n // 2 + 1) * self.kf).astype(dtype)
        sx, sy, sz = self.complex_slab
        return k_full[sx][:, None, None], k_full[sy][None, :, None], k_half[sz][None, None, :]

    def local_k2(self, dtype=None) -> np.ndarray:
        """|k|^2 of the local Fourier slab in (h/Mpc)^2 (``dtype``, default that of the field)."""
        kx, ky, kz = self.local_k(dtype)
        return kx**2 + ky**2 + kz**2

    def hermitian_weights(self) -> np.ndarray:
        """Weight of each mode of the half-complex axis: 1 for kz = 0 and (n even) Nyquist, else 2.
        Broadcastable against the local Fourier slab."""
        sz = self.complex_slab[2]
        w = np.full(self.n // 2 + 1, 2.0)
        w[0] = 1.0
        if self.n % 2 == 0:
            w[-1] = 1.0
        return w[sz][None, None, :]


def gaussian_window(k2: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian smoothing window W(k) = exp(-k^2 R^2 / 2) for R in Mpc/h, k^2 in (h/Mpc)^2."""
    if radius < 0:
        raise ValueError(f"smoothing radius must be >= 0, got {radius}")
    return np.exp(-0.5 * k2 * radius**2)


def laplacian_kernel(k2: np.ndarray) -> np.ndarray:
    """Fourier kernel of the Laplacian: -k^2."""
    return -k2


def tidal_kernel(fft: SlabFFT, i: int, j: int) -> np.ndarray:
    """k_i k_j / k^2 on the local Fourier slab (0 at k = 0): the Hessian of the potential of a
    field whose Laplacian is that field. Hermitian: for i != j it is 0 on the Nyquist planes of
    axes i and j (n even), where k_i = -n/2 k_f is its own mirror and k_i k_j would be odd under
    k -> -k, so that the real transform keeps the kernel's whole effect."""
    k = fft.local_k()
    k2 = fft.local_k2()
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(k2 > 0, (k[i] * k[j]) / np.where(k2 > 0, k2, 1), 0.0)
    if i != j and fft.n % 2 == 0:
        nyq = fft.n // 2 * fft.kf
        out = np.where((np.abs(k[i]) >= nyq * (1 - 1e-6)) | (np.abs(k[j]) >= nyq * (1 - 1e-6)), 0.0, out)
    return out.astype(fft.dtype, copy=False)


def smooth(fft: SlabFFT, delta_k: np.ndarray, radius: float) -> np.ndarray:
    """Real-space slab of the field ``delta_k`` smoothed with a Gaussian of ``radius`` Mpc/h."""
    return fft.backward(delta_k * gaussian_window(fft.local_k2(), radius))
