"""``python -m lagbias_mpi.pca``: principal components of grad_theta f of a trained ensemble (paper
section 4), optionally re-training on the leading PCs (Fig. 6).

    mpirun -n P python -m lagbias_mpi.pca --run DIR [--retrain K] [--n-sample 1000000] [--out DIR/pca]

1. The training simulations' particles get their features as in training; about ``n_sample`` of
   them (split evenly over the training boxes) are selected by a hash of (global particle id, seed),
   the same set on any number of ranks.
2. grad_theta f of the ensemble-average f = <10^y_m(theta)>_m at each selected particle (torch
   autograd, float64), and M = sum_i grad f_i grad f_i^T summed over ranks with one Allreduce.
3. Eigen-decomposition M = U diag(lambda) U^T, eigenvalues descending; the sign of each PC is
   chosen so that f increases along it on average. theta_PC = U^T theta; the coefficients of the PCs
   on the standardised raw features are C = U^T P Lambda^{-1/2} V^T (eq. 4.1; P Lambda^{-1/2} V^T is
   the orthogonaliser matrix of the run).
4. The mean f in bins of PC0 (distributed histogram) gives ``pc0_peak``, the PC0 of the bin with the
   largest mean f (the turn-over of f for thin mass ranges, Fig. 8).
5. ``--retrain K``: the network is trained again (same config, same sub-samples and batches) on the
   K leading PCs, theta_PC[:K] = (U^T M_orth)[:K] (raw - mu), which is an orthogonaliser of K rows,
   so the saved ``retrain_K/model.pt`` loads with :func:`lagbias_mpi.bias.ensemble.load_ensemble`.

Outputs (rank 0, atomic) in ``DIR/pca/``: ``summary.json``, ``figures/pc_planes.png`` (Fig. 5),
``figures/pc_coefficients.png`` (Fig. 7), ``figures/f_vs_pc0.png`` (Fig. 8), and with ``--retrain``
``retrain_K/`` (model.pt, spectra.h5, checkpoints) and ``figures/retrain_K.png`` (Fig. 6).
"""
from __future__ import annotations

import argparse
import sys

from mpi4py import MPI

from lagbias_mpi.workflows.cli import add_set_argument, run_command
from lagbias_mpi.workflows.pca import run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lagbias_mpi.pca", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of `train` (config.yaml, model.pt, summary.json)")
    p.add_argument("--retrain", type=int, nargs="?", const=2, default=None, metavar="K",
                   help="re-train on the K leading PCs (K = 2 when given without a value)")
    p.add_argument("--n-sample", type=int, default=1_000_000, help="particles sampled for grad f")
    p.add_argument("--seed", type=int, default=2023, help="seed of the particle sample")
    p.add_argument("--out", default=None, help="output directory (default RUN/pca)")
    add_set_argument(p, "override a key of the run's config (its simulations, the re-training), e.g. train.warmup_steps=50")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD

    return run_command(comm, lambda: run(comm, args.run, args.retrain, args.n_sample, args.seed, args.out,
                                         overrides=args.set))


if __name__ == "__main__":
    sys.exit(main())
