"""``python -m lagbias_mpi.bench --out DIR``: timings of the distributed primitives.

Writes ``DIR/summary.json`` (atomically) with
- ``fft_s``: median wall time of one r2c + c2r pair of an ``n``^3 float32 field with
  :class:`~lagbias_mpi.mpi.fft.SlabFFT` (after a warm-up; the backend in use); ``fft_scipy_s``: the
  same pair with ``scipy.fft.rfftn/irfftn(workers=1)`` on the same data on rank 0;
  ``fft_ratio_vs_scipy``; ``fft_s_by_backend`` (and ``fft_cpu_s_by_backend``): the pair with every
  installed backend (mpi4py-fft, pfft) and scipy, side by side in the same run;
- ``paint_cic_particles_per_s``: uniform particles (per-particle weights) painted with CIC into
  ``n``^3 by the numba kernel, already routed, after a warm-up (global particles / wall time), its
  value per rank, the same for a common weight, and ``paint_ratio_vs_numpy``: our time over that of
  :func:`~lagbias_mpi.mesh.paint.cic_numpy_reference` (``np.bincount``) on rank 0's particles;
- ``exchange_MB_per_s``: bytes moved per second by :func:`~lagbias_mpi.mpi.exchange.exchange` with
  random destinations (pos float32 x3 + lagr_index int32 x3 + weight float64 = 32 B per particle);
- ``feature_fft_bytes_per_ic_cell``: the FFT work per IC cell of the shipped feature columns
  computed one at a time (``--feature-n``^3, default ``--n``), float64 and float32 (the planner's
  ``FFT_WORK_CELL``);
- ``n_ranks``, versions, the arguments and the wall time of each stage.
``--recovery``: instead, the recovery benchmark of planted truths (:mod:`lagbias_mpi.workflows.recovery`;
``--truths corners|full|centre``, ``--settings shipped|all|inputs|both|every``, ``--config``, ``--set``), written to
``DIR/recovery.json`` and ``DIR/recovery.md``.
``--save-costs [PATH]`` also writes the per-unit costs (default: ``$LAGBIAS_COSTS`` or ``~/.cache/lagbias_mpi/costs.json``, where the planner looks first)
that the resource planner (:mod:`lagbias_mpi.plan`) loads; see docs/benchmarks.md.
The figures are for tracking performance; correctness is what the tests check.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mpi4py import MPI

from lagbias_mpi.core.logs import setup_logging
from lagbias_mpi.hpc.benchmarks import count, run
from lagbias_mpi.hpc.planner import user_costs_path


def main(argv=None) -> dict:
    """Command line entry point; returns the summary (on every rank)."""
    parser = argparse.ArgumentParser(prog="python -m lagbias_mpi.bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output directory (summary.json)")
    parser.add_argument("--n", type=count, default=256, help="FFT grid cells per side (and paint grid)")
    parser.add_argument("--paint-n", type=count, default=None, help="paint grid cells per side (default --n)")
    parser.add_argument("--feature-n", type=count, default=None,
                        help="IC grid cells per side of the feature-memory benchmark (default --n)")
    parser.add_argument("--particles", type=count, default=2**24, help="particles painted (global)")
    parser.add_argument("--exchange-particles", type=count, default=4 * 10**6, help="particles exchanged (global)")
    parser.add_argument("--repeat", type=count, default=5, help="timed repetitions (the median is kept)")
    parser.add_argument("--save-costs", nargs="?", const=user_costs_path(), default=None, type=Path,
                        help="also write per-unit costs for the planner to this path")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    parser.add_argument("--recovery", action="store_true", help="run the planted-truth recovery benchmark")
    parser.add_argument("--truths", default="corners", choices=["centre", "corners", "full"],
                        help="recovery: which planted truths")
    parser.add_argument("--settings", default="every", choices=["shipped", "all", "inputs", "both", "every"],
                        help="recovery: the shipped config, every particle selected (all), every density "
                             "eigenvector kept (inputs), shipped + all (both) or all three (every)")
    parser.add_argument("--config", type=Path, default=Path("configs/planted.yaml"), help="recovery: training config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recovery: training config override (repeatable)")
    args = parser.parse_args(argv)
    from lagbias_mpi.mpi.comm import abort_on_exception

    comm = MPI.COMM_WORLD
    setup_logging(comm, args.log_level)
    if args.recovery:
        from lagbias_mpi.workflows import recovery

        return abort_on_exception(comm)(recovery.run)(comm, args.out, args.config, args.truths, args.settings,
                                                      args.set, Path.cwd())
    if args.n < 2 or args.n < comm.size:
        parser.error(f"--n must be >= 2 and >= the number of ranks ({comm.size}), got {args.n}")
    return abort_on_exception(comm)(run)(comm, args.out, args.n, args.particles, args.repeat,
                                         args.exchange_particles, args.paint_n, args.save_costs, args.feature_n)


if __name__ == "__main__":
    main()
