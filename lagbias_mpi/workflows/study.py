"""The collective body of ``python -m lagbias_mpi.study`` (usage and outputs: the command's docstring
and docs/). Called with the communicator; returns the summary dict.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from mpi4py import MPI

from lagbias_mpi.bias import truth
from lagbias_mpi.bias.ensemble import load_ensemble, simulation_particles
from lagbias_mpi.bias.prepare import eval_nmesh
from lagbias_mpi.config.loader import ConfigError, from_dict
from lagbias_mpi.config.train import TrainRunConfig, config_run_hash, load_train_config
from lagbias_mpi.core.atomic import atomic_path, write_json
from lagbias_mpi.core.logs import get_logger, setup_logging
from lagbias_mpi.io import sources
from lagbias_mpi.io.spectra import read_spectra
from lagbias_mpi.mesh.paint import paint
from lagbias_mpi.mesh.power import mean_ratio_below, overdensity
from lagbias_mpi.mpi.comm import StageTimer
from lagbias_mpi.mpi.layout import slab_bounds
from lagbias_mpi.workflows import train as train_workflow
from lagbias_mpi.workflows.cli import write_summary

log = get_logger("study")


def set_label(cfg) -> str:
    """Table-1 name of a config's scales, or its radii."""
    s = cfg.features.scales
    return s if isinstance(s, str) else "R=" + ",".join(f"{r:g}" for r in cfg.features.radii)


def table_rows(names: list[str], cfgs: list, summaries: list[dict]) -> list[dict]:
    """One row per set from the run summaries (pure)."""
    rows = []
    for name, cfg, s in zip(names, cfgs, summaries):
        members = s.get("pk_ratio_lowk_members", {})
        val = [v for k, v in members.items() if not k.startswith("train")]
        val = val[0] if val else []
        rows.append({"run": name, "set": set_label(cfg), "radii": list(cfg.features.radii),
                     "n_inputs": s.get("n_inputs"), "pk_ratio_lowk_train": s.get("pk_ratio_lowk_train"),
                     "pk_ratio_lowk_val": s.get("pk_ratio_lowk_val"),
                     "pk_ratio_lowk_val_min": float(np.min(val)) if len(val) else None,
                     "pk_ratio_lowk_val_max": float(np.max(val)) if len(val) else None,
                     "final_train_loss": s.get("final_train_loss"), "final_val_loss": s.get("final_val_loss")})
    return rows


def markdown_table(rows: list[dict], kmax: float) -> str:
    def fmt(v, p=4):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{p}f}"

    head = (f"| set | R_f [Mpc/h] | inputs | P_model/P_h train (k<{kmax:g}) | P_model/P_h val | val members "
            "min-max | final train loss | final val loss |\n|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['set']} | {', '.join(f'{x:g}' for x in r['radii'])} | {r['n_inputs']} | "
             f"{fmt(r['pk_ratio_lowk_train'])} | {fmt(r['pk_ratio_lowk_val'])} | "
             f"{fmt(r['pk_ratio_lowk_val_min'])}-{fmt(r['pk_ratio_lowk_val_max'])} | "
             f"{fmt(r['final_train_loss'], 2)} | {fmt(r['final_val_loss'], 2)} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def slice_sum(comm, slab: np.ndarray, n: int, first: int, count: int) -> np.ndarray | None:
    """Mean over planes [first, first + count) of a slab-decomposed grid, on rank 0 (one reduce of
    an n x n array)."""
    lo, hi = slab_bounds(n, comm.size, comm.rank)
    a, b = max(lo, first), min(hi, first + count)
    local = slab[a - lo:b - lo].sum(axis=0) if b > a else np.zeros(slab.shape[1:], dtype=np.float64)
    out = np.zeros_like(local, dtype=np.float64) if comm.rank == 0 else None
    comm.Reduce(np.ascontiguousarray(local, dtype=np.float64), out, op=MPI.SUM, root=0)
    return out / count if comm.rank == 0 else None


def halo_slices(comm, cfg, run_dirs: list[Path], base_dir: Path, thickness: float) -> dict | None:
    """True and model delta slices on the first validation (else training) simulation (rank 0 gets
    them; None elsewhere)."""
    train_spec, val_specs = sources.resolve(comm, cfg.simulation, base_dir)
    spec = val_specs[0] if val_specs else train_spec
    sim = sources.load(comm, spec)
    box = sim.meta.box
    n = eval_nmesh(cfg.grid, box)
    count = max(int(round(thickness / (box / n))), 1)
    first = n // 2 - count // 2
    tpos, tw, _ = truth.true_tracers(comm, sim, cfg.halos)
    out = {"true": slice_sum(comm, overdensity(comm, paint(comm, tpos, tw, n, box, method="cic")), n, first, count),
           "models": [], "box": box, "thickness": count * box / n}
    for rd in run_dirs:
        ens = load_ensemble(rd)
        parts = simulation_particles(comm, sim, ens)
        f = ens.predict_f(parts.raw, standardised=True)
        out["models"].append(slice_sum(comm, overdensity(comm, paint(comm, parts.pos, f, n, box, method="cic")),
                                       n, first, count))
        del parts
    return out if comm.rank == 0 else None


def _val_members(summary: dict) -> list[float]:
    """P_model/P_h at low k of the members on the first validation simulation."""
    val = [v for k, v in summary.get("pk_ratio_lowk_members", {}).items() if not k.startswith("train")]
    return list(val[0]) if val else []


def variant_report(summary: dict, baseline: dict, uncorr: float | None = None,
                   baseline_uncorr: float | None = None) -> dict:
    """P_model/P_h at low k on validation of a variant run and of the baseline, the members' scatter
    (standard deviation), P_uncorr/P_h at low k (``uncorr``, the stochasticity left) and whether the
    variant is closer to 1 / scatters less / leaves less uncorrelated power (pure)."""
    def stats(s):
        m = _val_members(s)
        return s.get("pk_ratio_lowk_val"), (float(np.std(m)) if len(m) > 1 else None)

    (v, sv), (b, sb) = stats(summary), stats(baseline)
    return {"pk_ratio_lowk_val": v, "members_std": sv, "uncorr_ratio_lowk_val": uncorr,
            "baseline_pk_ratio_lowk_val": b, "baseline_members_std": sb, "baseline_uncorr_ratio_lowk_val": baseline_uncorr,
            "improves_mean": None if v is None or b is None else bool(abs(v - 1) < abs(b - 1)),
            "improves_scatter": None if sv is None or sb is None else bool(sv < sb),
            "improves_uncorr": None if uncorr is None or baseline_uncorr is None else bool(uncorr < baseline_uncorr)}


def uncorr_lowk(run_dir: Path, kmax: float) -> float | None:
    """P_uncorr/P_h of the ensemble-average f at k < kmax on the run's first validation simulation,
    from its spectra.h5 (rank 0; None without one)."""
    path = run_dir / "spectra.h5"
    if not path.is_file():
        return None
    spectra = read_spectra(path)
    label = next((k for k in spectra if k.startswith("val")), None)
    if label is None:
        return None
    return mean_ratio_below(spectra[label]["k"], spectra[label]["uncorr_ratio_avg"], kmax)


def finished_run_matches(rd: Path, cfg) -> str | None:
    """Why the run directory ``rd`` cannot stand for a training with ``cfg`` (None when it can: a
    finished run, summary.json and model.pt, whose config.yaml has the same training hash)."""
    if not ((rd / "summary.json").is_file() and (rd / "model.pt").is_file() and (rd / "config.yaml").is_file()):
        return "no finished run"
    try:
        old = from_dict(TrainRunConfig, yaml.safe_load((rd / "config.yaml").read_text()))
    except (ValueError, yaml.YAMLError) as exc:
        return f"its config.yaml does not load ({exc})"
    if config_run_hash(old) != config_run_hash(cfg):
        return "it was trained with a different configuration"
    return None


def _train_or_reuse(comm, timer, name, path, overrides, rd, retrain, base_dir, log_level) -> dict:
    """Train ``path`` into ``rd`` unless a finished run of the same configuration is there (or
    ``retrain``); returns its summary on every rank."""
    cfg = load_train_config(path, overrides)
    why = comm.bcast("--retrain" if retrain else finished_run_matches(rd, cfg) if comm.rank == 0 else None, root=0)
    if why is None:
        log.info(f"study: reusing the finished run {rd}")
    else:
        if (rd / "summary.json").is_file():
            log.info(f"study: not reusing {rd}: {why}")
        log.info(f"study: training {name} into {rd}")
        with timer.stage(f"train_{name}"):
            train_workflow.run(comm, path, overrides, out=rd, base_dir=base_dir)
        setup_logging(comm, log_level)
    comm.Barrier()  # rank 0 has written the run's summary.json
    return comm.bcast(json.loads((rd / "summary.json").read_text()) if comm.rank == 0 else None, root=0)


def run(comm, configs, out, overrides=None, retrain=False, thickness=10.0, slices=True, base_dir=None,
        kspace=False, multibox=None) -> dict:
    """Train (or reuse) every set and write the comparison; returns the summary dict.

    ``kspace`` / ``multibox`` (a list of ``key=value`` overrides): train the first config again
    with the Fourier-space loss / on several simulations and report them against it (the config's
    full-batch phase, ``train.polish``, included: its objective then holds the Fourier-space loss)."""
    out = Path(out)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    overrides = list(overrides or [])
    if not configs:
        raise ConfigError("--configs: no config given")
    cfgs = [load_train_config(c, overrides) for c in configs]  # all validated before any work
    variants = {}
    if kspace:
        variants["kspace"] = [*overrides, "train.kspace_loss.enabled=true"]
    if multibox:
        variants["multibox"] = [*overrides, *multibox]
    for key, ov in variants.items():
        vcfg = load_train_config(configs[0], ov)
        if key == "multibox" and len(vcfg.simulation.train_files) < 2 and len(vcfg.simulation.train_realisations) < 2:
            raise ConfigError(f"--multibox {multibox}: gives fewer than two training simulations")
    setup_logging(comm, cfgs[0].run.log_level)
    names = [Path(c).stem for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--configs: config file names must differ (run directories): {names}")
    kmax = cfgs[0].grid.kmax_lowk
    timer = StageTimer(comm)
    run_dirs, summaries = [], []
    level = cfgs[0].run.log_level
    for name, path in zip(names, configs):
        rd = out / name
        summaries.append(_train_or_reuse(comm, timer, name, path, overrides, rd, retrain, base_dir, level))
        run_dirs.append(rd)
    beyond = {"kspace": None, "multibox": None}
    for key, ov in variants.items():
        vname = f"{names[0]}__{key}"
        vs = _train_or_reuse(comm, timer, vname, configs[0], ov, out / vname, retrain, base_dir, level)
        uncorr = comm.bcast((uncorr_lowk(out / vname, kmax), uncorr_lowk(run_dirs[0], kmax))
                            if comm.rank == 0 else None, root=0)
        beyond[key] = {"run": vname, "run_dir": str(out / vname), "overrides": ov[len(overrides):],
                       **variant_report(vs, summaries[0], *uncorr)}
        log.info(f"study: {key}: P_model/P_h val {beyond[key]['pk_ratio_lowk_val']} (baseline "
                 f"{beyond[key]['baseline_pk_ratio_lowk_val']}), members std {beyond[key]['members_std']} "
                 f"(baseline {beyond[key]['baseline_members_std']}), P_uncorr/P_h {uncorr[0]} "
                 f"(baseline {uncorr[1]})")
    rows = table_rows(names, cfgs, summaries)
    slice_data = None
    if slices:
        with timer.stage("slices"):
            slice_data = halo_slices(comm, cfgs[0], run_dirs, base_dir, thickness)
    if comm.rank == 0:
        from lagbias_mpi.analysis import figures as analysis_plots

        with atomic_path(out / "table.md") as tmp:
            tmp.write_text(markdown_table(rows, kmax))
        write_json(out / "table.json", {"kmax_lowk": kmax, "rows": rows})
        spectra = [read_spectra(rd / "spectra.h5") for rd in run_dirs]
        analysis_plots.plot_study_spectra([r["set"] for r in rows], spectra, out / "figures" / "pk_ratio_sets.png",
                                          kmax)
        if slice_data is not None:
            analysis_plots.plot_slices([r["set"] for r in rows], slice_data, out / "figures" / "halo_slices.png")
    summary = {"n_ranks": comm.size, "sets": rows, "kmax_lowk": kmax,
               "pk_ratio_lowk_val": {r["set"]: r["pk_ratio_lowk_val"] for r in rows},
               "pk_ratio_lowk_val_kspace": beyond["kspace"], "pk_ratio_lowk_val_multibox": beyond["multibox"],
               "run_dirs": [str(r) for r in run_dirs], "configs": [str(c) for c in configs], "overrides": overrides}
    write_summary(comm, out / "summary.json", summary, timer)
    log.info("study done:\n" + markdown_table(rows, kmax))
    return summary
