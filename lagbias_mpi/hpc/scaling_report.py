"""Scaling reports: read the summaries of a series of runs, efficiency tables (markdown) and plots.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lagbias_mpi.core.atomic import atomic_path, write_json

STAGES = ("features", "routing", "orthogonalise", "train", "evaluate")


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
