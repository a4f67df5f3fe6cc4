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
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from . import plan
from .config import apply_overrides, load_yaml
from .logs import get_logger, setup_logging
from .output import atomic_path, write_json

log = get_logger("scaling")

STAGES = ("features", "routing", "orthogonalise", "train", "evaluate")
REPO = Path(__file__).resolve().parent.parent


# ---- problem growth (pure) ---------------------------------------------------------------------

def weak_factor(ranks: int, ranks_first: int) -> float:
    """Linear growth factor s = (ranks / ranks_first)^(1/3) of a weak-scaling series."""
    if ranks < 1 or ranks_first < 1:
        raise ValueError("rank counts must be >= 1")
    return (ranks / ranks_first) ** (1.0 / 3.0)


def _simulate_sizes(data: dict, base_dir: Path) -> dict:
    """box, ppd, n_ic of the built-in simulation a training config dict asks for."""
    sim = data["simulation"]
    path = Path(sim["simulate"])
    for cand in (path, base_dir / path, REPO / path):
        if cand.is_file():
            box, ppd, n_ic = plan.builtin_sizes(cand, sim.get("simulate_set"))
            return {"box": box, "ppd": ppd, "n_ic": n_ic}
    raise ValueError(f"simulation.simulate: config file not found: {sim['simulate']}")


def grow_config(data: dict, ratio: float, base_dir: Path | None = None) -> tuple[dict, dict]:
    """Config dict of a weak-scaling member whose problem is ``ratio`` times larger, and what
    changed. Built-in simulation only: ppd x ratio^(1/3) (rounded), n_ic keeping its multiple of
    ppd, box keeping the particle mass (box/ppd fixed), eval_nmesh keeping the evaluation cell; the
    training grid follows the box at fixed ``grid.cell``. Refuses other sources with the reason."""
    if ratio < 1:
        raise ValueError(f"weak scaling grows the problem: ratio {ratio} < 1")
    out = json.loads(json.dumps(data))
    sim = out.get("simulation") or {}
    if sim.get("abacus"):
        raise ValueError("weak scaling of AbacusSummit runs would train on more boxes, but "
                         "lagbias_mpi.train trains on one simulation (simulation.abacus.train): use "
                         "--kind strong for AbacusSummit configs, or the built-in simulation")
    if not sim.get("simulate"):
        raise ValueError("weak scaling needs a built-in simulation (simulation.simulate): fixed "
                         "simulation files cannot grow")
    size = _simulate_sizes(out, base_dir or Path.cwd())
    if ratio == 1:
        return out, {}
    s = ratio ** (1.0 / 3.0)
    ppd = max(int(round(size["ppd"] * s)), 2)
    mult = max(size["n_ic"] // size["ppd"], 1)
    changed = {"ppd": ppd, "n_ic": ppd * mult, "box": size["box"] * ppd / size["ppd"]}
    sets = [x for x in (sim.get("simulate_set") or ()) if x.split("=", 1)[0].strip() not in changed]
    sets += [f"{k}={v}" for k, v in changed.items()]
    sim["simulate_set"] = sets
    grid = out.setdefault("grid", {})
    if grid.get("eval_cell") is None:
        ev = int(round(int(grid.get("eval_nmesh", 256) or 256) * ppd / size["ppd"]))
        grid["eval_nmesh"] = ev
        changed["grid.eval_nmesh"] = ev
    return out, changed


PATH_KEYS = ("simulate", "cache_dir", "train_files", "val_files")


def absolute_paths(data: dict, base: Path) -> dict:
    """Copy of a training config dict whose file paths in ``simulation`` are absolute (relative
    ones are taken from ``base``, the directory the training command would run in)."""
    out = json.loads(json.dumps(data))
    sim = out.get("simulation") or {}

    def fix(p):
        return p if p is None or Path(p).is_absolute() else str((Path(base) / p).resolve())

    for key in PATH_KEYS:
        if isinstance(sim.get(key), str):
            sim[key] = fix(sim[key])
        elif isinstance(sim.get(key), list):
            sim[key] = [fix(p) for p in sim[key]]
    return out


# ---- plan: sbatch scripts ------------------------------------------------------------------------

def _describe(data: dict, base_dir: Path) -> dict | None:
    """Sizes of a member (for series.json), or None when they cannot be worked out here."""
    try:
        size = plan.sizes_from_dict(data, base_dir)
    except (ValueError, OSError):
        return None
    return {"box": size.box, "ppd": size.ppd, "n_ic": size.n_ic, "n_particles": size.n_particles,
            "train_nmesh": size.train_nmesh, "eval_nmesh": size.eval_nmesh}


SBATCH_TEMPLATE = """#!/bin/bash
# lagbias_mpi {kind} scaling member: {nodes} node(s) x {rpn} ranks = {ranks} ranks.
# Generated by: python -m lagbias_mpi.scaling plan (edit jobs/site_env.sh, not this file).
#SBATCH --job-name=lbs-{kind}-n{nodes}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={rpn}
#SBATCH --cpus-per-task={cpt}
{gpu_line}#SBATCH --time={time}
#SBATCH --output={out}/logs/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
{extra}
set -euo pipefail
export LAGBIAS_ROOT={root}
source "$LAGBIAS_ROOT/jobs/site_env.sh"
source "$LAGBIAS_ROOT/jobs/lib.sh"
cd "$LAGBIAS_ROOT"
RUN_DIR={run_dir}
lagbias_prepare_run_dir "$RUN_DIR"
lagbias_requeue_on_signal
lagbias_srun {srun_flags} --ntasks-per-node={rpn} --cpus-per-task={cpt} \\
    $LAGBIAS_PYTHON -m lagbias_mpi.{command} --config {config} --out "$RUN_DIR" $(lagbias_resume_flag "$RUN_DIR")
"""

SUBMIT_TEMPLATE = """#!/bin/bash
# Submit the {kind} scaling series ({members}). Usage: bash submit_all.sh [extra sbatch flags]
# Afterwards: python -m lagbias_mpi.scaling report {runs} --out {out}/report
set -euo pipefail
cd "$(dirname "$0")"
for script in {scripts}; do
  sbatch "$@" "$script"
done
"""


def plan_series(config_path: str, kind: str, nodes: list[int], ranks_per_node: int, out: Path,
                overrides: list[str] | None = None, time_limit: str = "01:00:00",
                cpus_per_task: int = 1, gpus_per_node: int = 0, command: str = "train",
                sbatch_extra: tuple[str, ...] = ()) -> dict:
    """Write resolved configs, one sbatch script per node count and ``submit_all.sh``; return a
    description of the series (also written as ``series.json``)."""
    if kind not in ("strong", "weak"):
        raise ValueError(f"--kind must be strong or weak, got {kind!r}")
    if not nodes or any(n < 1 for n in nodes):
        raise ValueError(f"--nodes needs positive node counts, got {nodes}")
    if ranks_per_node < 1:
        raise ValueError(f"--ranks-per-node must be >= 1, got {ranks_per_node}")
    base = absolute_paths(apply_overrides(load_yaml(config_path), overrides), Path.cwd())
    plan.check_train_config(base)
    nodes = sorted(set(int(n) for n in nodes))
    rpn = gpus_per_node if gpus_per_node else ranks_per_node
    members, scripts, warnings = [], [], []
    datas = {n: (grow_config(base, n / nodes[0], Path.cwd()) if kind == "weak" else (base, {})) for n in nodes}
    out = Path(out).resolve()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for n in nodes:
        ranks = n * rpn
        data, changed = datas[n]
        size = _describe(data, Path.cwd())
        if size and ranks > min(size["n_ic"], size["eval_nmesh"]):
            warnings.append(f"{n} nodes: {ranks} ranks > {min(size['n_ic'], size['eval_nmesh'])} planes of "
                            "the IC / evaluation grid: the slab FFTs refuse this; lower --ranks-per-node")
            log.warning(warnings[-1])
        cfg = out / "configs" / f"{kind}_n{n}.yaml"
        with atomic_path(cfg) as tmp:
            tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        run_dir = out / "runs" / f"{kind}_n{n}"
        gpu_line = f"#SBATCH --gpus-per-node={gpus_per_node}\n" if gpus_per_node else ""
        script = SBATCH_TEMPLATE.format(
            kind=kind, nodes=n, rpn=rpn, ranks=ranks, cpt=cpus_per_task, time=time_limit,
            gpu_line=gpu_line, out=out, root=shlex.quote(str(REPO)), run_dir=shlex.quote(str(run_dir)),
            srun_flags="--gpu" if gpus_per_node else "--cpu", config=shlex.quote(str(cfg)),
            command=command, extra="\n".join(f"#SBATCH {e}" for e in sbatch_extra))
        path = out / f"{kind}_n{n}.sbatch"
        with atomic_path(path) as tmp:
            tmp.write_text(script)
        scripts.append(path.name)
        members.append({"nodes": n, "ranks": ranks, "config": str(cfg), "script": str(path),
                        "run_dir": str(run_dir), "changed": changed,
                        "size": size})
    runs = " ".join(str(out / "runs" / f"{kind}_n{n}") for n in nodes)
    with atomic_path(out / "submit_all.sh") as tmp:
        tmp.write_text(SUBMIT_TEMPLATE.format(kind=kind, members=", ".join(f"{n} nodes" for n in nodes),
                                              runs=runs, out=out, scripts=" ".join(scripts)))
    os.chmod(out / "submit_all.sh", 0o755)
    series = {"kind": kind, "base_config": str(Path(config_path).resolve()), "overrides": list(overrides or []),
              "ranks_per_node": rpn, "gpus_per_node": gpus_per_node, "members": members,
              "warnings": warnings}
    write_json(out / "series.json", series)
    return series


# ---- local: mpirun series on this machine --------------------------------------------------------

def mpirun_command(ranks: int, argv: list[str], mpirun: str = "mpirun") -> list[str]:
    """The mpirun command line for ``ranks`` ranks (oversubscription allowed)."""
    return shlex.split(mpirun) + ["--oversubscribe", "-n", str(ranks), sys.executable] + argv


def loss_history(summary: dict) -> list[float] | None:
    """The per-epoch training loss of a run's first ensemble member, or None."""
    v = summary.get("loss_history")
    if isinstance(v, list) and v and isinstance(v[0], dict):
        v = v[0].get("train_loss")
    elif isinstance(v, dict):
        v = v.get("train_loss")
    if isinstance(v, list) and v and isinstance(v[0], list):
        v = v[0]
    if isinstance(v, list) and v and all(x is None or isinstance(x, (int, float)) for x in v):
        return [float("nan") if x is None else float(x) for x in v]
    return None


def compare_losses(histories: dict[int, list[float] | None]) -> dict:
    """Largest relative difference of each rank count's loss history from the first one's."""
    ranks = sorted(histories)
    ref = histories[ranks[0]]
    out = {"reference_ranks": ranks[0], "max_rel_diff": {}}
    for r in ranks[1:]:
        h = histories[r]
        if ref is None or h is None or len(h) != len(ref):
            out["max_rel_diff"][str(r)] = None
            continue
        a, b = np.asarray(ref, float), np.asarray(h, float)
        out["max_rel_diff"][str(r)] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))
    return out


def run_local(config_path: str, ranks: list[int], out: Path, overrides: list[str] | None = None,
              kind: str = "strong", mpirun: str = "mpirun", command: str = "train",
              timeout_s: float = 3600.0, loss_rtol: float = 1e-3) -> dict:
    """Run the series with mpirun, one run directory per rank count, then report (single process:
    call this without mpirun)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = absolute_paths(apply_overrides(load_yaml(config_path), overrides), Path.cwd())
    plan.check_train_config(base)
    ranks = sorted(set(int(r) for r in ranks))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", HDF5_USE_FILE_LOCKING="FALSE")
    env.pop("OMPI_COMM_WORLD_SIZE", None)
    cores = os.cpu_count() or 1
    runs, histories = [], {}
    for p in ranks:
        data = grow_config(base, p / ranks[0], Path.cwd())[0] if kind == "weak" else base
        cfg = out / "configs" / f"{kind}_r{p}.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cfg) as tmp:
            tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        run_dir = out / f"ranks_{p}"
        cmd = mpirun_command(p, ["-m", f"lagbias_mpi.{command}", "--config", str(cfg), "--out", str(run_dir)],
                             mpirun)
        log.info(f"{p} rank(s){' (oversubscribed: correctness, not speed)' if p > cores else ''}: "
                 f"{shlex.join(cmd)}")
        (out / "logs").mkdir(exist_ok=True)
        t0 = time.perf_counter()
        with open(out / "logs" / f"ranks_{p}.log", "w") as logf:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                  timeout=timeout_s)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"run with {p} ranks failed (exit {proc.returncode}); see "
                               f"{out / 'logs' / f'ranks_{p}.log'}")
        summary = json.loads((run_dir / "summary.json").read_text())
        histories[p] = loss_history(summary)
        runs.append({"ranks": p, "run_dir": str(run_dir), "wall_s": wall, "oversubscribed": p > cores})
    agreement = compare_losses(histories) if kind == "strong" else None
    if agreement is not None:
        diffs = [d for d in agreement["max_rel_diff"].values() if d is not None]
        agreement["rtol"] = loss_rtol
        agreement["agree"] = bool(diffs) and max(diffs) <= loss_rtol and None not in agreement["max_rel_diff"].values()
        log.info(f"loss histories vs {ranks[0]} rank(s): max relative difference "
                 f"{agreement['max_rel_diff']} (tolerance {loss_rtol}): "
                 f"{'agree' if agreement['agree'] else 'DIFFER'}")
    over = [r["ranks"] for r in runs if r["oversubscribed"]]
    extra = (f"Run on {cores} cores with mpirun"
             + (f"; {over} rank(s) oversubscribe the cores: those runs check correctness, not speed" if over else "")
             + ".")
    if agreement is not None:
        extra += (f" Training loss histories against {ranks[0]} rank(s): max relative difference "
                  f"{agreement['max_rel_diff']} (tolerance {loss_rtol}): "
                  f"{'agree' if agreement['agree'] else 'DIFFER'}.")
    rep = report([Path(r["run_dir"]) for r in runs], out / "report", kind=kind, extra=extra)
    result = {"kind": kind, "config": str(Path(config_path).resolve()), "overrides": list(overrides or []),
              "cores": cores, "runs": runs, "loss_agreement": agreement, "report": rep["files"]}
    write_json(out / "local_summary.json", result)
    return result


# ---- report -------------------------------------------------------------------------------------

def _first(d: dict, names: tuple[str, ...]):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return None


def _mmm(v) -> dict | None:
    """A min/mean/max dict from a dict, a per-rank list or a scalar."""
    if isinstance(v, dict) and "max" in v:
        return {k: float(v[k]) for k in ("min", "mean", "max") if k in v and v[k] is not None}
    if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
        return {"min": float(min(v)), "mean": float(np.mean(v)), "max": float(max(v))}
    if isinstance(v, (int, float)):
        return {"min": float(v), "mean": float(v), "max": float(v)}
    return None


def _exchange_bytes_per_rank(v, n_ranks: int) -> dict | None:
    """Bytes sent per rank by each exchange: {name: max-over-ranks bytes} from the summary's
    ``exchange_bytes`` (per exchange a number = total over ranks, or a min/mean/max dict, or a
    per-rank list)."""
    if not isinstance(v, dict):
        return None
    out = {}
    for name, val in v.items():
        if isinstance(val, dict) and "bytes_max" in val:  # lagbias_mpi.train: max over ranks
            out[name] = float(val["bytes_max"])
            continue
        if isinstance(val, dict) and "sent" in val:
            val = val["sent"]
        m = _mmm(val)
        if m is None:
            continue
        if isinstance(val, (int, float)):  # a plain number is the total over ranks
            out[name] = float(val) / max(n_ranks, 1)
        else:
            out[name] = m["max"]
    return out


def read_run(run_dir: Path) -> dict:
    """One row of the report from a run directory's summary.json (missing keys noted)."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"no summary.json in {run_dir}")
    s = json.loads(path.read_text())
    env = s.get("environment", {}) if isinstance(s.get("environment"), dict) else {}
    notes = []
    n_ranks = _first(s, ("n_ranks",)) or env.get("n_ranks")
    if n_ranks is None:
        raise ValueError(f"{path}: no n_ranks, cannot place the run in a scaling series")
    stages = s.get("stage_wall_s") or s.get("stages") or {}
    row = {"run": str(path.parent), "n_ranks": int(n_ranks), "stage_wall_s": {}, "notes": notes}
    for st in STAGES:
        v = stages.get(st)
        if v is None:
            v = stages.get({"train": "training", "evaluate": "evaluation"}.get(st, st))
        row["stage_wall_s"][st] = None if v is None else float(v)
        if v is None:
            notes.append(f"no stage_wall_s.{st}")
    row["total_wall_s"] = (float(stages["total"]) if "total" in stages else
                           float(sum(float(x) for k, x in stages.items() if isinstance(x, (int, float)))) if stages else None)
    ep = s.get("epoch_wall_s")
    if isinstance(ep, list):  # per epoch, or per member per epoch
        ep = [x for e in ep for x in (e if isinstance(e, list) else [e]) if isinstance(x, (int, float))]
        ep = float(np.median(ep)) if ep else None
    elif isinstance(ep, dict):
        ep = _first(ep, ("median", "mean", "max"))
    row["epoch_wall_s"] = None if ep is None else float(ep)
    if ep is None:
        notes.append("no epoch_wall_s")
    row["n_particles"] = _first(s, ("n_particles",))
    row["n_selected"] = _first(s, ("n_selected",))
    rss = _first(s, ("peak_rss_mb",))
    row["peak_rss_mb"] = _mmm(rss)["max"] if _mmm(rss) else None
    if rss is None:
        notes.append("no peak_rss_mb")
    xb = _exchange_bytes_per_rank(_first(s, ("exchange_bytes",)), int(n_ranks))
    row["exchange_bytes_per_rank"] = xb
    row["exchange_bytes_per_rank_total"] = None if xb is None else float(sum(xb.values()))
    if xb is None:
        notes.append("no exchange_bytes")
    for what, names in (("particles", ("particles_per_rank", "particles")),
                        ("cells", ("cells_per_rank", "cells"))):
        m = _mmm(_first(s, names))
        row[f"{what}_per_rank"] = m
        row[f"{what}_imbalance"] = (m["max"] / m["mean"]) if m and m.get("mean") else None
        if m is None:
            notes.append(f"no {what} per rank")
    return row


def efficiency(rows: list[dict], kind: str, key=lambda r: r["total_wall_s"]) -> list[float | None]:
    """Parallel efficiency against the smallest rank count: strong T1 P1 / (P TP), weak T1 / TP."""
    ref = rows[0]
    t1, p1 = key(ref), ref["n_ranks"]
    out = []
    for r in rows:
        t = key(r)
        if not t or not t1:
            out.append(None)
        elif kind == "strong":
            out.append(t1 * p1 / (r["n_ranks"] * t))
        else:
            out.append(t1 / t)
    return out


def _fmt(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def markdown_table(rows: list[dict], kind: str) -> str:
    """The report table in Markdown (one line per run, sorted by rank count)."""
    head = (["ranks"] + [f"{s} [s]" for s in STAGES] +
            ["epoch [s]", "total [s]", "efficiency", "exchange MB/rank", "peak RSS MB/rank",
             "particles max/mean", "cells max/mean"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        xb = r["exchange_bytes_per_rank_total"]
        cells = ([str(r["n_ranks"])] + [_fmt(r["stage_wall_s"][s]) for s in STAGES] +
                 [_fmt(r["epoch_wall_s"]), _fmt(r["total_wall_s"]), _fmt(r["efficiency"], ".2f"),
                  _fmt(None if xb is None else xb / 1e6), _fmt(r["peak_rss_mb"], ".0f"),
                  _fmt(r["particles_imbalance"], ".3f"), _fmt(r["cells_imbalance"], ".3f")])
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {Path(r['run']).name} ({r['n_ranks']} ranks): " + "; ".join(r["notes"])
             for r in rows if r["notes"]]
    eff = ("strong scaling: efficiency = T(P0) P0 / (P T(P))" if kind == "strong"
           else "weak scaling: efficiency = T(P0) / T(P)")
    text = f"{eff}, P0 = {rows[0]['n_ranks']}, on the total wall time. Stage times are max over ranks.\n\n"
    text += "\n".join(lines) + "\n"
    if notes:
        text += "\nMissing in summary.json (cells shown as —):\n" + "\n".join(notes) + "\n"
    return text


def plot_report(rows: list[dict], kind: str, path: Path) -> None:
    """PNG with four panels: stage times, efficiency, exchange bytes and peak RSS per rank."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = np.array([r["n_ranks"] for r in rows])
    fig, ax = plt.subplots(2, 2, figsize=(10, 8))
    for st in STAGES + ("epoch",):
        t = [r["epoch_wall_s"] if st == "epoch" else r["stage_wall_s"][st] for r in rows]
        if any(v is not None for v in t):
            ax[0, 0].plot(p, [np.nan if v is None else v for v in t], "o-", label=st)
    if kind == "strong" and rows[0]["total_wall_s"]:
        ax[0, 0].plot(p, rows[0]["total_wall_s"] * p[0] / p, "k:", label="ideal (total)")
    ax[0, 0].set(xscale="log", yscale="log", xlabel="ranks", ylabel="wall time [s] (max over ranks)",
                 title="time per stage")
    ax[0, 0].legend(fontsize=7)
    eff = [np.nan if r["efficiency"] is None else r["efficiency"] for r in rows]
    ax[0, 1].plot(p, eff, "o-", label="total")
    for st in STAGES:
        e = efficiency(rows, kind, key=lambda r, st=st: r["stage_wall_s"][st])
        if any(v is not None for v in e):
            ax[0, 1].plot(p, [np.nan if v is None else v for v in e], ".--", alpha=0.6, label=st)
    ax[0, 1].axhline(1.0, color="k", lw=0.5)
    ax[0, 1].set(xscale="log", xlabel="ranks", ylabel="efficiency", title=f"{kind} scaling efficiency")
    ax[0, 1].legend(fontsize=7)
    names = sorted(set().union(*[(r["exchange_bytes_per_rank"] or {}).keys() for r in rows]))
    for name in names:
        ax[1, 0].plot(p, [np.nan if not r["exchange_bytes_per_rank"] else
                          r["exchange_bytes_per_rank"].get(name, np.nan) / 1e6 for r in rows], "o-", label=name)
    ax[1, 0].set(xscale="log", yscale="log" if names else "linear", xlabel="ranks", ylabel="MB sent per rank (max)",
                 title="bytes exchanged per rank")
    if names:
        ax[1, 0].legend(fontsize=7)
    ax[1, 1].plot(p, [np.nan if r["peak_rss_mb"] is None else r["peak_rss_mb"] for r in rows], "o-",
                  label="peak RSS MB (max over ranks)")
    ax[1, 1].set(xscale="log", xlabel="ranks", ylabel="MB", title="peak memory per rank")
    tw = ax[1, 1].twinx()
    for what, style in (("particles", "s--"), ("cells", "^--")):
        v = [r[f"{what}_imbalance"] for r in rows]
        if any(x is not None for x in v):
            tw.plot(p, [np.nan if x is None else x for x in v], style, color="gray", label=f"{what} max/mean")
    tw.set_ylabel("load imbalance max/mean")
    ax[1, 1].legend(loc="upper left", fontsize=7)
    tw.legend(loc="lower right", fontsize=7)
    for a in ax.ravel():
        a.set_xticks(p, [str(x) for x in p])
        a.minorticks_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def guess_kind(rows: list[dict]) -> str:
    """strong when every run has the same particle count (or it is unknown), else weak."""
    n = {r["n_particles"] for r in rows if r["n_particles"] is not None}
    return "weak" if len(n) > 1 else "strong"


def report(run_dirs: list[Path], out: Path, kind: str | None = None, extra: str = "") -> dict:
    """Collect runs into ``scaling.md``, ``scaling.json`` and ``scaling.png`` in ``out``
    (``extra``: Markdown appended to the table)."""
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    rows = sorted((read_run(Path(d)) for d in run_dirs), key=lambda r: r["n_ranks"])
    kind = kind or guess_kind(rows)
    if kind not in ("strong", "weak"):
        raise ValueError(f"kind must be strong or weak, got {kind!r}")
    for r, e in zip(rows, efficiency(rows, kind)):
        r["efficiency"] = e
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown_table(rows, kind) + (f"\n{extra}\n" if extra else "")
    with atomic_path(out / "scaling.md") as tmp:
        tmp.write_text(f"# lagbias_mpi {kind} scaling\n\n" + md)
    files = {"markdown": str(out / "scaling.md"), "json": str(out / "scaling.json"), "png": str(out / "scaling.png")}
    write_json(out / "scaling.json", {"kind": kind, "stages": list(STAGES), "rows": rows, "files": files})
    plot_report(rows, kind, out / "scaling.png")
    return {"kind": kind, "rows": rows, "markdown": md, "files": files}


# ---- command line -------------------------------------------------------------------------------

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
