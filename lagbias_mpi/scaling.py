"""Scaling tests: sbatch series over node counts, local mpirun series, and a report of the runs.

``python -m lagbias_mpi.scaling plan --config FILE --kind strong|weak --nodes 1 2 4 ... --out DIR``
writes, per node count, the resolved training config and an sbatch script, plus ``submit_all.sh``.
``python -m lagbias_mpi.scaling local --config FILE --ranks 1 2 4 --out DIR`` runs the series with
mpirun on this machine (more ranks than cores checks correctness, not speed) and compares the loss
histories. ``python -m lagbias_mpi.scaling report DIR... --out DIR`` collects the runs'
summary.json into a Markdown + JSON table and a PNG.

Weak scaling grows the problem with the rank count P (ratio r = P / P_first):

- built-in simulation: volume at fixed resolution. ``ppd``, ``n_ic``, the box and the training and
  evaluation grids are all multiplied by s = r^(1/3) (rounded to integers; the box follows ppd so
  the particle mass stays fixed). Particles, IC cells and grid cells per rank then stay constant
  and the physics (particle mass, cell size, smoothing scales, halo threshold) is unchanged, so
  every stage does the same work per rank: the only honest weak-scaling problem for this code.
- AbacusSummit: a box is a fixed simulation, so the problem could only grow by training on more
  boxes, which ``lagbias_mpi.train`` does not do (one training simulation): weak scaling is refused
  for AbacusSummit configs; use strong scaling on a small or base box.

Run records read from summary.json: ``n_ranks``, ``stage_wall_s`` (max over ranks),
``exchange_bytes``, particles and cells per rank (min/mean/max), ``peak_rss_mb``, ``epoch_wall_s``,
``n_particles``, ``n_selected``; a missing key gives an empty cell and a note.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lagbias_mpi.core.logs import get_logger, setup_logging
from lagbias_mpi.hpc.scaling_report import report
from lagbias_mpi.hpc.scaling_series import plan_series, run_local

log = get_logger("scaling")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lagbias_mpi.scaling", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("plan", help="sbatch scripts for a series of node counts", formatter_class=fmt)
    p.add_argument("--config", required=True, help="training config (YAML)")
    p.add_argument("--kind", choices=("strong", "weak"), default="strong")
    p.add_argument("--nodes", type=int, nargs="+", required=True, help="node counts")
    p.add_argument("--ranks-per-node", type=int, default=128, help="MPI ranks per node (CPU nodes)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPU nodes: one rank per GPU (overrides ranks per node)")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--time", default="01:00:00", help="wall-time limit per job")
    p.add_argument("--command", default="train", help="lagbias_mpi module each job runs")
    p.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH line, e.g. --sbatch=--account=m1234")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", required=True, help="directory for scripts, configs, runs")
    q = sub.add_parser("local", help="run the series with mpirun on this machine", formatter_class=fmt)
    q.add_argument("--config", required=True)
    q.add_argument("--ranks", type=int, nargs="+", required=True)
    q.add_argument("--kind", choices=("strong", "weak"), default="strong")
    q.add_argument("--mpirun", default="mpirun", help="launcher (flags allowed, e.g. 'mpirun --bind-to none')")
    q.add_argument("--command", default="train")
    q.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    q.add_argument("--loss-rtol", type=float, default=1e-3, help="loss histories agree within this")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--out", required=True)
    r = sub.add_parser("report", help="table + PNG from run directories", formatter_class=fmt)
    r.add_argument("runs", nargs="+", help="run directories (or summary.json files)")
    r.add_argument("--kind", choices=("strong", "weak"), default=None, help="default: guessed from n_particles")
    r.add_argument("--out", required=True)
    return ap


def main(argv=None) -> dict:
    """Entry point of ``python -m lagbias_mpi.scaling`` (a single process, not under mpirun)."""
    from mpi4py import MPI

    args = build_parser().parse_args(argv)
    setup_logging(MPI.COMM_SELF)
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error(str(exc))
        raise SystemExit(2) from None


def _dispatch(args) -> dict:
    if args.cmd == "plan":
        res = plan_series(args.config, args.kind, args.nodes, args.ranks_per_node, Path(args.out), args.set,
                          args.time, args.cpus_per_task, args.gpus_per_node, args.command, tuple(args.sbatch))
        log.info(f"wrote {len(res['members'])} sbatch scripts and submit_all.sh to {args.out}")
        return res
    if args.cmd == "local":
        return run_local(args.config, args.ranks, Path(args.out), args.set, args.kind, args.mpirun,
                         args.command, args.timeout, args.loss_rtol)
    res = report([Path(d) for d in args.runs], Path(args.out), args.kind)
    sys.stdout.write(res["markdown"])
    return res


if __name__ == "__main__":
    main()
