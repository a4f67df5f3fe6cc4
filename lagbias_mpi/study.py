"""``python -m lagbias_mpi.study``: the smoothing-scale study of the paper's Table 1 (Figs. 4 and 10).

    mpirun -n P python -m lagbias_mpi.study --configs configs/table1/*.yaml --out DIR [--set key=value ...]

Each config is trained with ``train`` into ``DIR/<config stem>/`` (a set whose run directory already
holds a ``summary.json`` is reused, unless ``--retrain``), on the same simulations. Then:

- ``table.md`` / ``table.json``: per set the radii, number of inputs, P_model/P_h at k < kmax_lowk on
  the training and validation simulations, the min/max over members on validation (the scatter),
  and the final training and validation losses;
- ``figures/pk_ratio_sets.png`` (Fig. 4): P_model/P_h and P_uncorr/P_h on the validation simulation,
  one colour per set, members' min-max as a band;
- ``figures/halo_slices.png`` (Fig. 10): a slice (``--slice-thickness`` Mpc/h, through the box centre)
  of the true halo field on the evaluation grid, model minus true for every set, and each set minus
  the first set. Only the slice planes are reduced to rank 0, never a grid;
- ``summary.json`` with the table, environment, per-stage wall times.

Beyond the paper (off by default): ``--kspace`` trains the first config again with the Fourier-space
loss (``train.kspace_loss.enabled=true``) into ``DIR/<stem>__kspace/``, ``--multibox KEY=VALUE``
(repeatable, e.g. ``simulation.train_realisations=[0,2,3]``) with several training simulations into
``DIR/<stem>__multibox/``; ``summary.json`` then reports each as ``pk_ratio_lowk_val_kspace`` /
``pk_ratio_lowk_val_multibox`` next to the baseline (the first config): P_model/P_h at low k on the
validation simulation, the members' scatter and whether each improves (null when not asked).
"""
from __future__ import annotations

import argparse
import sys

from mpi4py import MPI

from lagbias_mpi.workflows.cli import add_set_argument, run_command
from lagbias_mpi.workflows.study import run


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lagbias_mpi.study", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="+", required=True, help="training configs, one per smoothing-scale set")
    p.add_argument("--out", required=True, help="study directory (one run directory per config inside)")
    add_set_argument(p, "override a key in every config (repeatable)")
    p.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--slice-thickness", type=float, default=10.0, help="thickness of the Fig. 10 slice in Mpc/h")
    p.add_argument("--no-slices", action="store_true", help="skip the halo-field slices (Fig. 10)")
    p.add_argument("--kspace", action="store_true",
                   help="also train the first config with the Fourier-space loss (train.kspace_loss)")
    p.add_argument("--multibox", action="append", default=[], metavar="KEY=VALUE",
                   help="also train the first config on several simulations with these overrides, e.g. "
                        "simulation.train_realisations=[0,2] (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD

    return run_command(comm, lambda: run(comm, args.configs, args.out, args.set, args.retrain, args.slice_thickness,
                                         not args.no_slices, kspace=args.kspace, multibox=args.multibox))


if __name__ == "__main__":
    sys.exit(main())
