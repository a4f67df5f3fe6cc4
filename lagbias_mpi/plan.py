"""``python -m lagbias_mpi.plan``: memory per rank and time per stage of a training job, before it is submitted.

    python -m lagbias_mpi.plan --config FILE.yaml --nodes N --cores-per-node C --mem-per-node GIB
        [--gpus-per-node G] [--ranks-per-node R] [--set key=value ...] [--costs FILE] [--out plan.json]

Says whether the job fits the nodes and finds the smallest one that does. The model behind it:
:mod:`lagbias_mpi.hpc.planner` and docs/supercomputer.md.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.hpc.planner import (
    BASELINE_MB,
    BYTES,
    format_table,
    load_costs,
    plan_job,
    smallest_fit,
)
from lagbias_mpi.hpc.problem import load_sizes

log = get_logger("plan")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lagbias_mpi.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", required=True, help="training config (YAML)")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--cores-per-node", type=int, required=True)
    ap.add_argument("--mem-per-node", type=float, required=True, help="memory per node in GiB")
    ap.add_argument("--gpus-per-node", type=int, default=0, help="GPU nodes: one rank per GPU")
    ap.add_argument("--ranks-per-node", type=int, default=None, help="default: cores (or GPUs) per node")
    ap.add_argument("--costs", default=None, help="costs JSON (default: lagbias_mpi/data/costs.json, else built-in)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default=None, help="write the plan as JSON here")
    return ap


def main(argv=None) -> dict:
    """Entry point (one process; no MPI needed)."""
    from mpi4py import MPI

    from lagbias_mpi.core.atomic import write_json
    from lagbias_mpi.core.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(MPI.COMM_SELF)
    try:
        size = load_sizes(args.config, args.set)
        costs = load_costs(args.costs)
    except (ValueError, OSError) as exc:
        log.error(str(exc))
        raise SystemExit(2) from None
    plan = plan_job(size, args.nodes, args.cores_per_node, args.mem_per_node, args.gpus_per_node,
                    args.ranks_per_node, costs)
    best = smallest_fit(size, args.cores_per_node, args.mem_per_node, args.gpus_per_node,
                        args.ranks_per_node, costs)
    sys.stdout.write(format_table(size, plan, best))
    result = {"config": str(Path(args.config).resolve()), "overrides": args.set, "size": asdict(size),
              "n_selected": size.n_selected, "n_inputs": size.n_inputs, "plan": plan,
              "smallest_fit": None if best is None else {"nodes": best["nodes"], "ranks": best["ranks"],
                                                         "peak_bytes": best["memory"]["peak_bytes"],
                                                         "total_s": best["time"]["total_s"]},
              "costs": costs, "model": {"baseline_mb": BASELINE_MB, "bytes": BYTES}}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
