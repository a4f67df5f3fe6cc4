"""FFT backends behind :class:`~lagbias_mpi.mpi.fft.SlabFFT`: which one is chosen
(``$LAGBIAS_FFT_BACKEND``), whether it is installed, FFTW's planner effort, the interface a backend
implements and the mpi4py-fft backend (the pfft-python one is :mod:`lagbias_mpi.mpi.fft_pfft`).
"""
from __future__ import annotations

import os

import numpy as np

BACKENDS = ("mpi4py-fft", "pfft")


BACKEND_ENV = "LAGBIAS_FFT_BACKEND"


_BACKEND_MODULES = {"mpi4py-fft": ("mpi4py_fft", "mpi4py-fft"), "pfft": ("pfft", "pfft-python")}


INSTALL_HINT = {"mpi4py-fft": "pip install --no-build-isolation mpi4py-fft",
                "pfft": "`make pfft` (builds it without internet) or `pip install pfft-python`"}


def backend_name(name: str | None = None) -> str:
    """The FFT backend to use: ``name`` if given, else ``$LAGBIAS_FFT_BACKEND``, else mpi4py-fft.
    Refuses an unknown name, and a known one that is not installed (naming how to install it)."""
    if name is None:
        name = os.environ.get(BACKEND_ENV, "").strip() or BACKENDS[0]
        where = f"{BACKEND_ENV}={name!r}"
    else:
        where = f"FFT backend {name!r}"
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown FFT backend; available: {BACKENDS}")
    if not backend_installed(name):
        raise ValueError(f"{where}: {_BACKEND_MODULES[name][1]} is not installed; install it with "
                         f"{INSTALL_HINT[name]}")
    return name


def backend_installed(name: str) -> bool:
    """Whether the Python package of backend ``name`` imports."""
    import importlib

    try:
        importlib.import_module(_BACKEND_MODULES[name][0])
    except ImportError:
        return False
    return True


def installed_backends() -> list[str]:
    """Names of the backends whose package imports, in :data:`BACKENDS` order."""
    return [name for name in BACKENDS if backend_installed(name)]


def backend_version(name: str) -> str | None:
    """Installed version of backend ``name``'s package (None when missing)."""
    from importlib import metadata

    if not backend_installed(name):
        return None
    module, dist = _BACKEND_MODULES[name]
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:  # pragma: no cover - built in place
        return getattr(__import__(module), "__version__", "unknown")


PLANNER_ENV = "LAGBIAS_FFTW_PLANNER"


PLANNERS = ("FFTW_ESTIMATE", "FFTW_MEASURE", "FFTW_PATIENT", "FFTW_EXHAUSTIVE")


def planner_effort() -> str:
    """FFTW planner effort of this process: ``$LAGBIAS_FFTW_PLANNER`` or FFTW_MEASURE."""
    effort = os.environ.get(PLANNER_ENV, "FFTW_MEASURE").strip().upper()
    if effort not in PLANNERS:
        raise ValueError(f"{PLANNER_ENV}={effort!r}: choose one of {PLANNERS}")
    return effort


class FFTBackend:
    """Interface of a distributed r2c/c2r backend."""

    name = "abstract"
    version = "0"
    real_slab: tuple[slice, slice, slice]  # global index ranges of the local real array
    complex_slab: tuple[slice, slice, slice]  # global index ranges of the local complex array

    def forward(self, real: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, cplx: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class _Mpi4pyFFTBackend(FFTBackend):
    name = "mpi4py-fft"

    def __init__(self, comm, n: int, dtype):
        import mpi4py_fft
        from mpi4py_fft import PFFT

        self.version = mpi4py_fft.__version__
        # On one rank nothing is cut: one collapsed 3-D FFTW plan (no transposes) is ~2x faster
        # than three 1-D stages. On more ranks collapsing would cut k_z instead of k_y: not used.
        self._fft = PFFT(comm, (n, n, n), axes=(0, 1, 2), dtype=dtype, grid=(-1,), collapse=comm.size == 1,
                         planner_effort=planner_effort())
        self.real_slab = tuple(self._fft.local_slice(False))
        self.complex_slab = tuple(self._fft.local_slice(True))

    def forward(self, real):
        out = np.empty(self._fft.forward.output_array.shape, self._fft.forward.output_array.dtype)
        return self._fft.forward(np.ascontiguousarray(real), out, normalize=False)

    def backward(self, cplx):
        out = np.empty(self._fft.backward.output_array.shape, self._fft.backward.output_array.dtype)
        # c2r transforms may overwrite their input: hand over a copy
        return self._fft.backward(np.array(cplx, copy=True), out, normalize=True)
