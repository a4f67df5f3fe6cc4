"""``python -m lagbias_mpi.info``: the software this installation runs on, and the number of ranks.

Prints Python, numpy, scipy, numba, torch (CUDA availability and device count), mpi4py, the MPI
library and standard versions, the FFT backend in use (mpi4py-fft) with its version and the FFTW
library it loaded, h5py (and HDF5), abacusutils, and the number of MPI ranks. Runs under mpirun
(rank 0 prints). ``--json`` prints the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

from lagbias_mpi.mpi.environment import collect, format_info


def main(argv=None) -> dict:
    """Print the environment report on rank 0; return it (on every rank)."""
    parser = argparse.ArgumentParser(prog="python -m lagbias_mpi.info", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    from lagbias_mpi.mpi.comm import abort_on_exception

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
