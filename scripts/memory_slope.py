"""Bytes per particle of every stage of `train`, measured from two runs that differ only in the
particle count (issue #11): slope = delta(stage peak RSS per rank, max over ranks) / delta(training
particles per rank). The per-IC-cell, per-grid-cell and per-rank terms are the same in both runs and
cancel. Each run's peak is also set beside the planner's prediction (``memory_per_rank``).

    python scripts/memory_slope.py --ranks 1 2 --ppd 64 128 --out docs/results/memory_slope.json

Each run: configs/default.yaml with the built-in simulation at n_ic 256 and the given ppd, generated
into --cache (kept between calls) by a process of its own before the measured run, 2 epochs, every particle selected (``sampling.frac: 1``, the
2 Gpc/h configuration's choice and the worst case of the batches), no figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(ppd: int, cache: Path, extra: list[str]) -> list[str]:
    return [f'simulation.simulate_set=["ppd={ppd}", "n_ic=256", "output.figures=false"]',
            f"simulation.cache_dir={cache}", "train.epochs=2", "sampling.frac=1.0", "run.figures=false", *extra]


def predicted(ranks: int, ppd: int, cache: Path, extra: list[str]) -> dict:
    """The planner's peak per stage (MB) for the same run."""
    from lagbias_mpi.hpc.planner import MB, memory_per_rank
    from lagbias_mpi.hpc.problem import load_sizes

    size = load_sizes(str(ROOT / "configs/default.yaml"), overrides(ppd, cache, extra))
    mem = memory_per_rank(size, ranks)
    return {"stage_mb": {k: v / MB for k, v in mem["bytes"].items()}, "peak_mb": mem["peak_bytes"] / MB,
            "peak_stage": mem["peak_stage"]}


ENSURE = """import sys
from mpi4py import MPI
from lagbias_mpi.config.train import load_train_config
from lagbias_mpi.io.sources import resolve_training
resolve_training(MPI.COMM_WORLD, load_train_config(sys.argv[1], sys.argv[2:]).simulation)
"""


def _launch(ranks: int, args: list[str], timeout: float) -> None:
    cmd = [sys.executable, *args]
    if ranks > 1:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks),
               "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "HDF5_USE_FILE_LOCKING", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HDF5_USE_FILE_LOCKING": "FALSE"}
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=timeout)


def run(ranks: int, ppd: int, cache: Path, out: Path, extra: list[str], timeout: float) -> dict:
    summary = out / "summary.json"
    if not summary.exists():
        sets = overrides(ppd, cache, extra)
        # a missing simulation is generated in a process of its own: generated inside the measured run,
        # it would leave its memory (FFT plans, heap) under every stage (+131 MB per rank at ppd 256)
        _launch(ranks, ["-c", ENSURE, str(ROOT / "configs/default.yaml"), *sets], timeout)
        _launch(ranks, ["-m", "lagbias_mpi.train", "--config", str(ROOT / "configs/default.yaml"),
                        *[x for o in sets for x in ("--set", o)], "--out", str(out)], timeout)
    s = json.loads(summary.read_text())
    plan = predicted(ranks, ppd, cache, extra)
    return {"stage_peak_rss_mb": s["stage_peak_rss_mb"], "stage_rss_trace_mb": s.get("stage_rss_trace_mb"),
            "particles_per_rank": s["particles_per_rank"]["mean"],
            "peak_rss_mb": s["peak_rss_mb"], "memory_bytes_per_particle": s["memory_bytes_per_particle"],
            "planner": plan, "planner_ratio": plan["peak_mb"] / s["peak_rss_mb"]}


def slopes(lo: dict, hi: dict) -> dict:
    dn = hi["particles_per_rank"] - lo["particles_per_rank"]
    stages = sorted(set(lo["stage_peak_rss_mb"]) & set(hi["stage_peak_rss_mb"]))
    per = {k: (hi["stage_peak_rss_mb"][k] - lo["stage_peak_rss_mb"][k]) * 2.0**20 / dn for k in stages}
    out = {"delta_particles_per_rank": dn, "bytes_per_particle": per,
           "max_bytes_per_particle": max(per.values()), "max_stage": max(per, key=per.get)}
    # every stage occurrence on its own (training box, then validation box): the slope of its peak
    # and of the RSS it starts from (what earlier stages left resident)
    ta, tb = lo.get("stage_rss_trace_mb"), hi.get("stage_rss_trace_mb")
    if ta and tb and [t["stage"] for t in ta] == [t["stage"] for t in tb]:
        seen: dict = {}
        occ = {}
        for a, b in zip(ta, tb):
            k = seen[a["stage"]] = seen.get(a["stage"], 0) + 1
            occ[f"{a['stage']}#{k}"] = {key: (b[key] - a[key]) * 2.0**20 / dn for key in ("start_mb", "peak_mb")}
        out["occurrence_bytes_per_particle"] = occ
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ppd", type=int, nargs=2, default=[64, 128])
    ap.add_argument("--cache", type=Path, default=ROOT / "data/sims")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/memory_slope")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/memory_slope.json")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--set", action="append", default=[], help="further train overrides")
    a = ap.parse_args(argv)
    extra = list(a.set)
    report = {"ppd": a.ppd, "frac": 1.0, "runs": {}, "slopes": {}}
    for ranks in a.ranks:
        got = [run(ranks, ppd, a.cache, a.runs / f"ppd{ppd}_n{ranks}", extra, a.timeout) for ppd in a.ppd]
        report["runs"][str(ranks)] = dict(zip(map(str, a.ppd), got))
        report["slopes"][str(ranks)] = sl = slopes(*got)
        for k, v in sl.get("occurrence_bytes_per_particle", {}).items():
            print(f"  {k}: peak {v['peak_mb']:.0f} B/particle (from a start of {v['start_mb']:.0f})")
        print(f"{ranks} rank(s): " + ", ".join(f"{k} {v:.0f}" for k, v in sl["bytes_per_particle"].items())
              + f" B/particle (max {sl['max_bytes_per_particle']:.0f} in {sl['max_stage']}); peak RSS "
              + ", ".join(f"{g['peak_rss_mb']:.0f} MB (planner {g['planner']['peak_mb']:.0f})" for g in got), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
