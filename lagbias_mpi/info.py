"""``python -m lagbias_mpi.info``: the software this installation runs on, and the number of ranks.

Prints Python, numpy, scipy, numba, torch (CUDA availability and device count), mpi4py, the MPI
library and standard versions, the FFT backend in use (mpi4py-fft) with its version and the FFTW
library it loaded, h5py (and HDF5), abacusutils, and the number of MPI ranks. Runs under mpirun
(rank 0 prints). ``--json`` prints the same as JSON.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
from importlib import metadata

from . import __version__


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


def collect(comm) -> dict:
    """Everything ``info`` prints, as a dict (rank-local: no collective call)."""
    import mpi4py
    from mpi4py import MPI

    from .fft import BACKENDS

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
        "fft_backend": BACKENDS[0],
        "fft_backend_version": _version("mpi4py_fft", "mpi4py-fft"),
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


def main(argv=None) -> dict:
    """Print the environment report on rank 0; return it (on every rank)."""
    parser = argparse.ArgumentParser(prog="python -m lagbias_mpi.info", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    from .parallel import abort_on_exception

    comm = MPI.COMM_WORLD

    @abort_on_exception(comm)
    def run():
        info = collect(comm)
        if comm.rank == 0:
            sys.stdout.write((json.dumps(info, indent=2) if args.json else format_info(info)) + "\n")
            sys.stdout.flush()
        return info

    return run()


if __name__ == "__main__":
    main()
