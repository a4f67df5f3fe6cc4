"""``python -m lagbias_mpi.train``: train, evaluate and save an ensemble of f(theta) networks.

    mpirun -n P python -m lagbias_mpi.train --config FILE.yaml [--set key=value ...] [--out DIR] [--resume]

Stages (all collective, timed): features (IC smoothing + standardisation), routing (Lagrangian
routing + feature readout, Eulerian routing, true field on the training grid), orthogonalise, train
(DDP, per member), evaluate (spectra on the evaluation grid). The run directory layout is described
in docs/run_directory.md.
"""
from __future__ import annotations

import argparse
import sys

from mpi4py import MPI

from lagbias_mpi.training.stopping import StopControl
from lagbias_mpi.workflows.cli import add_config_arguments, run_command
from lagbias_mpi.workflows.train import run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lagbias_mpi.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p, "training config YAML")
    p.add_argument("--out", default=None, help="run directory (default runs/<run.name or config stem>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoints")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop (as if killed) after this many epochs in this invocation; for testing --resume")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop (as on SIGTERM: mid-epoch checkpoint) after this many optimiser steps; for testing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD

    stop = StopControl(args.stop_after_epochs, args.stop_after_steps)
    rc = run_command(comm, lambda: run(comm, args.config, args.set, args.out, args.resume, stop=stop))
    if rc == 0 and stop.signalled is not None:
        return 128 + int(stop.signalled)  # stopped by a signal (checkpointed): the shell's convention
    return rc


if __name__ == "__main__":
    sys.exit(main())
