"""``python -m lagbias_mpi.lstsq``: Paper I's binned least-squares f for one smoothing scale.

    mpirun -n P python -m lagbias_mpi.lstsq --config FILE.yaml [--set key=value ...] [--nn-run DIR] [--out DIR]

The (delta, lap) plane of one scale R_f is cut into ``n_delta`` bins of the standardised delta_R
(uniform in ``delta_range``, the outer bins open) and, inside each delta bin, ``n_lap`` bins at the
percentiles of lap_R of the particles in that delta bin. f is constant in each bin. With the
training sub-sampling (per cell n_sel of n particles, scale_j = N_cells / N_part * n_j / n_sel_j)
the model field is linear in the bin values,

    1 + delta_model[j] = sum_b A[j, b] f_b,   A[j, b] = scale_j * (selected particles of cell j in bin b),

so the squared error of the halo field, sum_j (A f - (1 + delta_true))_j^2, needs only the normal
equations A^T A and A^T (1 + delta_true), sums over cells: cells and their particles are local after
Eulerian routing, so every rank sums its cells and one Allreduce adds them up (all sub-samples in
the same reduction). Rank 0 solves min |A f - y|^2 with f >= 0 and sum_b N_b f_b / N = 1 (N_b: all
particles of the simulation in bin b, so that <f> = 1 over the particles) and broadcasts f.

Percentiles are approximate: a distributed histogram of lap with ``fine_bins`` bins between its global
minimum and maximum per delta bin (one Allreduce of integer counts, so the edges are identical on
any number of ranks), linearly interpolated inside a fine bin.

The constrained problem is solved with ``scipy.optimize.lsq_linear`` (method "bvls", bounds f >= 0)
on the square-root form of the normal equations, R = Lambda^{1/2} V^T with A^T A = V Lambda V^T,
plus the equality as one heavily weighted row; the result is then divided by its mean
sum_b N_b f_b / N (a relative change below ~1e-6), which keeps f >= 0 and makes <f> = 1 hold to
rounding.
"""
from __future__ import annotations

import argparse
import sys

from mpi4py import MPI

from lagbias_mpi.workflows.cli import add_config_arguments, run_command
from lagbias_mpi.workflows.lstsq import run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lagbias_mpi.lstsq", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p, "config YAML (a training config + optional lstsq section)")
    p.add_argument("--nn-run", default=None,
                   help="run directory of a NN trained on the same single scale (delta, lap), for comparison")
    p.add_argument("--out", default=None,
                   help="output directory (default <nn-run>/lstsq, else runs/<run.name or config stem>/lstsq)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD

    return run_command(comm, lambda: run(comm, args.config, args.set, args.nn_run, args.out))


if __name__ == "__main__":
    sys.exit(main())
