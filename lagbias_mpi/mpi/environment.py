"""What a run ran on: versions of Python, numpy, torch, mpi4py and the MPI library, FFT backend
(``$LAGBIAS_FFT_BACKEND``: mpi4py-fft or pfft) and its version, ranks.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from importlib import metadata

import numpy as np

from lagbias_mpi import __version__


def _version(module_name: str, dist_name: str | None = None) -> str | None:
    """Version of an importable module (None when missing)."""
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    try:
        return metadata.version(dist_name or module_name)
    except metadata.PackageNotFoundError:
        return getattr(module, "__version__", "unknown")


def fftw_version() -> str | None:
    """Version string of the FFTW library that mpi4py-fft loaded (from its ``fftw_version``)."""
    try:
        from mpi4py_fft.fftw import fftw_xfftn  # noqa: F401 - loads libfftw3
    except ImportError:
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libfftw3.so" in line or "libfftw3." in line}
    except OSError:
        paths = set()
    for path in sorted(p for p in paths if p.startswith("/") and "threads" not in p and "fftw3f" not in p):
        try:
            return (ctypes.c_char * 128).in_dll(ctypes.CDLL(path), "fftw_version").value.decode()
        except (OSError, ValueError):
            continue
    return None


def fft_backend_info() -> dict:
    """``fft_backend`` (the one ``SlabFFT`` uses in this process: ``$LAGBIAS_FFT_BACKEND`` or
    mpi4py-fft) and ``fft_backend_version`` (None when its package is missing)."""
    from lagbias_mpi.mpi.fft_backends import BACKEND_ENV, BACKENDS, backend_version

    name = os.environ.get(BACKEND_ENV, "").strip() or BACKENDS[0]
    return {"fft_backend": name, "fft_backend_version": backend_version(name) if name in BACKENDS else None}


def collect(comm) -> dict:
    """Everything ``info`` prints, as a dict (rank-local: no collective call)."""
    import mpi4py
    from mpi4py import MPI

    from lagbias_mpi.mpi.fft_backends import installed_backends

    info = {
        "lagbias_mpi": __version__,
        "python": f"{sys.version.split()[0]} ({platform.python_implementation()}, {sys.executable})",
        "platform": platform.platform(),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "numba": _version("numba"),
        "torch": _version("torch"),
        "torch_cuda_available": None,
        "torch_cuda_devices": 0,
        "mpi4py": mpi4py.__version__,
        "mpi_library": MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip(),
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        **fft_backend_info(),
        "fft_backends_installed": ", ".join(installed_backends()),
        "fftw": fftw_version(),
        "h5py": _version("h5py"),
        "hdf5": None,
        "abacusutils": _version("abacusnbody", "abacusutils"),
        "yaml": _version("yaml", "pyyaml"),
        "n_ranks": comm.size,
        "host": platform.node(),
    }
    try:
        import torch

        info["torch_cuda_available"] = bool(torch.cuda.is_available())
        info["torch_cuda_devices"] = int(torch.cuda.device_count())
    except ImportError:
        pass
    try:
        import h5py

        info["hdf5"] = h5py.version.hdf5_version
    except ImportError:
        pass
    return info


def format_info(info: dict) -> str:
    """Aligned ``key : value`` lines."""
    width = max(len(k) for k in info)
    return "\n".join(f"{k:<{width}} : {'not installed' if v is None else v}" for k, v in info.items())


def environment_info(comm) -> dict:
    """Versions and rank count recorded in every summary.json."""
    import mpi4py
    from mpi4py import MPI

    library = MPI.Get_library_version().replace("\x00", "")  # Open MPI pads it with a NUL
    info = {"lagbias_mpi": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
            "mpi4py": mpi4py.__version__, "mpi_library": library.splitlines()[0].strip(),
            "n_ranks": comm.size, "host": platform.node(),
            "fftw_planner": os.environ.get("LAGBIAS_FFTW_PLANNER", "FFTW_MEASURE"), **fft_backend_info()}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        info["torch"] = None
    return info
