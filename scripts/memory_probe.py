"""Where a box's preparation (and with ``--train`` its training) holds its memory: the RSS at entry,
the peak during and the RSS at exit of every call of the main functions of ``prepare_training``
(load, features, Lagrangian and Eulerian routing, orthogonaliser, true field) and of
``train_ensemble`` (batches, epochs, full-batch phase, normalisation), per rank. Two runs that differ only in the particle
count give each function's bytes per particle (issue #11; the stage-level slope is
scripts/memory_slope.py):

    mpirun -n 2 python scripts/memory_probe.py --out p64.json --set sampling.frac=1.0 \\
        --set 'simulation.simulate_set=["ppd=64", "n_ic=256", "output.figures=false"]'
    mpirun -n 2 python scripts/memory_probe.py --out p128.json --set sampling.frac=1.0 \\
        --set 'simulation.simulate_set=["ppd=128", "n_ic=256", "output.figures=false"]'
    python scripts/memory_probe.py --diff p64.json p128.json

The peak of a call is the process's VmHWM after a reset at its entry (Linux ``/proc/self/clear_refs``),
so nested calls reset their parent's peak: read a function's own row, not its parent's. At every exit
also glibc's main heap size and its mapped blocks (``core.memory.heap_info``): a heap that grows
holds its pages resident.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRAPPED = {
    "lagbias_mpi.bias.prepare": ["featurised_particles", "fit_orthogonaliser", "theta_of_raw", "eulerian_route",
                                 "true_tracers", "delta_slab"],
    "lagbias_mpi.bias.particles": ["route_lagrangian", "route_eulerian"],
    "lagbias_mpi.bias.routing": ["exchange", "_ownership_and_counts", "cell_order_destinations",
                                 "permute_rows_in_place", "sort_cells_by_id"],
}
# with --train: the training of the prepared box (names as the calling module sees them)
WRAPPED_TRAIN = {
    "lagbias_mpi.training.members": ["member_batches", "build_batches", "interleave", "train_member",
                                     "normalise_over_all_particles"],
    "lagbias_mpi.training.loop": ["_epochs", "_polish"],
}


def _train(world, cfg, timer, trs, orth, scratch: Path) -> None:
    """The train stage of ``lagbias_mpi.train`` on the prepared boxes (its own function: positions set
    aside, the ensemble trained with checkpoints in ``scratch``), then the files set aside removed."""
    import torch

    from lagbias_mpi.bias.model import network_shape
    from lagbias_mpi.training import ddp
    from lagbias_mpi.training.stopping import StopControl
    from lagbias_mpi.workflows.train import drop_spilled, train_members

    ddp.configure_torch(cfg.train.threads)
    with ddp.process_group(world):
        train_members(world, timer, cfg, trs, network_shape(orth.matrix.shape[0], cfg.model), scratch, scratch,
                       getattr(torch, cfg.train.dtype), ddp.device_for(world), False, StopControl())
        drop_spilled(trs)


def probe(args) -> None:
    import importlib

    from mpi4py import MPI

    from lagbias_mpi.bias.prepare import validate_inputs
    from lagbias_mpi.config.train import load_train_config
    from lagbias_mpi.core.memory import heap_info, tune_malloc
    from lagbias_mpi.mpi import comm as mc

    tune_malloc()
    world = MPI.COMM_WORLD
    rows, depth = [], [0]

    def wrap(module, name):
        f = getattr(module, name)

        @functools.wraps(f)
        def traced(*a, **k):
            rss_in = mc.current_rss_mb()
            mc.reset_peak_rss()
            depth[0] += 1
            try:
                return f(*a, **k)
            finally:
                depth[0] -= 1
                heap = heap_info() or {}
                rows.append({"depth": depth[0], "name": f"{module.__name__.split('.')[-1]}.{name}",
                             "in_mb": rss_in, "peak_mb": mc.peak_rss_mb(), "out_mb": mc.current_rss_mb(),
                             **{f"{k}_mb_out": v / 2**20 for k, v in heap.items()}})
        setattr(module, name, traced)

    for mod, names in (WRAPPED | WRAPPED_TRAIN if args.train else WRAPPED).items():
        module = importlib.import_module(mod)
        for name in names:
            wrap(module, name)
    prepare = importlib.import_module("lagbias_mpi.bias.prepare")
    cfg = load_train_config(args.config, args.set)
    specs, _ = validate_inputs(world, cfg, ROOT)
    timer = mc.StageTimer(world, track_rss=True)
    base = mc.current_rss_mb()
    trs, orth, *_ = prepare.prepare_training(world, timer, cfg, specs, {}, scratch=Path(args.scratch))
    if args.train:
        _train(world, cfg, timer, trs, orth, Path(args.scratch))
    report = {"n_local": trs[0].parts.n_local, "baseline_mb": base, "calls": rows}
    stages = timer.rss_summary()
    got = world.gather(report)
    if world.rank == 0:
        Path(args.out).write_text(json.dumps({"stage_peak_rss_mb": stages, "ranks": got}, indent=1) + "\n")
        for d in got[0]["calls"]:
            print(f"{'  ' * d['depth']}{d['name']:40s} in {d['in_mb']:8.1f} peak {d['peak_mb']:8.1f} out {d['out_mb']:8.1f} MB")
        print(f"wrote {args.out}")


def diff(a_path: str, b_path: str) -> None:
    """Bytes per particle of every call (rank 0): delta(peak, in, out) / delta(particles)."""
    a, b = (json.loads(Path(p).read_text())["ranks"][0] for p in (a_path, b_path))
    dn = b["n_local"] - a["n_local"]
    print(f"rank 0: {a['n_local']} -> {b['n_local']} particles")
    for x, y in zip(a["calls"], b["calls"]):
        if x["name"] != y["name"]:
            raise SystemExit(f"the runs called other functions: {x['name']} / {y['name']}")
        keys = [k for k in ("in_mb", "peak_mb", "out_mb", "heap_mb_out", "mapped_mb_out") if k in x and k in y]
        per = {k: (y[k] - x[k]) * 2.0**20 / dn for k in keys}
        print(f"{'  ' * x['depth']}{x['name']:40s} B/particle: "
              + " ".join(f"{k.replace('_mb', '')} {v:6.1f}" for k, v in per.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    ap.add_argument("--set", action="append", default=[], help="config overrides")
    ap.add_argument("--scratch", default="runs/memory_probe_scratch")
    ap.add_argument("--out", default="memory_probe.json")
    ap.add_argument("--train", action="store_true", help="also train the ensemble and probe its calls")
    ap.add_argument("--diff", nargs=2, metavar=("SMALL", "LARGE"))
    a = ap.parse_args(argv)
    if a.diff:
        diff(*a.diff)
    else:
        probe(a)


if __name__ == "__main__":
    main()
