"""``python -m lagbias_mpi.predict``: apply a trained bias model to any simulation.

    mpirun -n P python -m lagbias_mpi.predict --run RUN_DIR --config PREDICT.yaml [--set key=value ...] [--out DIR]

Features with the training run's orthogonaliser and moments, f of every particle (ensemble average,
members on request), painted at the final positions into RUN_DIR/predict/<name>/model_field.h5;
spectra against the true halo field where the simulation has one. See docs/predict.md.
"""
from __future__ import annotations

import argparse
import sys

from mpi4py import MPI

from lagbias_mpi.workflows.cli import add_config_arguments, run_command
from lagbias_mpi.workflows.predict import run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lagbias_mpi.predict", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="training run directory (holds model.pt and config.yaml)")
    add_config_arguments(p, "predict config YAML (simulation + output sections)")
    p.add_argument("--out", default=None, help="output directory (default RUN/predict/<output.name or config stem>)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    return run_command(comm, lambda: run(comm, args.config, args.run, args.set, args.out))


if __name__ == "__main__":
    sys.exit(main())
