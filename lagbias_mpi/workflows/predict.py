"""``python -m lagbias_mpi.predict``: apply a trained ensemble to any simulation (docs/predict.md).

    mpirun -n P python -m lagbias_mpi.predict --run RUN_DIR --config PREDICT.yaml [--set k=v ...] [--out DIR]

Stages (all collective, timed): load; features (the IC features with the training run's scales,
kinds and standardisation moments; the new box's own moments are compared with them); routing
(Lagrangian routing + feature readout); predict (the network inputs with the training
orthogonaliser, f of every particle: ensemble average, members on request); field (paint 1 + delta_model
at the final positions, written slab by slab into model_field.h5; particles_f.h5 on request);
spectra (P_model(k); against the true halo field, when the simulation has one, the spectra of
:func:`lagbias_mpi.bias.evaluate.evaluate_simulation`, exactly as training evaluates).

Memory (bytes per particle of the box, beyond the grids): the loaded columns (24-28), the routed
copy with its feature rows (4 per raw feature + 20), f (4, and 4 per member with ``members``); the
network inputs are made in chunks. Training holds all of that plus its Eulerian copy and batches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from mpi4py import MPI

from lagbias_mpi.analysis import plots, predict_figures
from lagbias_mpi.bias.ensemble import load_ensemble
from lagbias_mpi.bias.evaluate import evaluate_simulation
from lagbias_mpi.bias.features import feature_names
from lagbias_mpi.bias.particles import featurised_particles
from lagbias_mpi.bias.prepare import apply_orthogonaliser, eval_nmesh
from lagbias_mpi.bias.truth import true_tracers
from lagbias_mpi.config.loader import ConfigError, to_dict
from lagbias_mpi.config.predict import PredictConfig, load_predict_config
from lagbias_mpi.config.train import config_run_hash, load_train_config
from lagbias_mpi.core.logs import get_logger, setup_logging
from lagbias_mpi.core.memory import ROWS_PER_STEP
from lagbias_mpi.core.spill import remove_empty_dir, spiller
from lagbias_mpi.io import sources
from lagbias_mpi.io.fieldfile import write_field, write_particles
from lagbias_mpi.io.spectra import write_spectra
from lagbias_mpi.mesh.paint import paint
from lagbias_mpi.mesh.power import mean_ratio_below, overdensity, power_spectrum
from lagbias_mpi.mpi.comm import (
    StageTimer,
    global_min_max_mean,
    global_sum,
)
from lagbias_mpi.mpi.fft import SlabFFT
from lagbias_mpi.mpi.layout import slab_bounds
from lagbias_mpi.training.ddp import configure_torch
from lagbias_mpi.workflows.cli import write_summary

log = get_logger("predict")


CHUNK = ROWS_PER_STEP  # particles turned into network inputs at a time


def training_run(run_dir: Path):
    """(training config, its :func:`config_run_hash`) of a run directory; refuses a directory
    without ``model.pt`` or ``config.yaml`` (ConfigError)."""
    if not (run_dir / "model.pt").is_file():
        raise ConfigError(f"--run {run_dir}: no trained model (model.pt) there; train first "
                          f"(python -m lagbias_mpi.train)")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: config.yaml missing (not a training run directory)")
    train_cfg = load_train_config(run_dir / "config.yaml")
    return train_cfg, config_run_hash(train_cfg)


def has_truth(meta) -> bool:
    """Whether a simulation carries a true halo field (halos, or a planted f_true)."""
    return meta.kind == "planted" or meta.n_halos > 0


def check_inputs(comm, cfg: PredictConfig, train_cfg, radii, meta, source: str) -> dict:
    """What can be checked from the metadata before any heavy work; returns the resolved
    {nmesh, kmax, compare, halos}. Raises ConfigError naming the problem."""
    cell = meta.box / meta.n_ic
    low = [r for r in radii if r < cell * (1 - 1e-9)]
    if low:
        raise ConfigError(f"the model's smoothing scale(s) {low} Mpc/h are below the IC grid spacing "
                          f"{cell:.4g} Mpc/h (box {meta.box} / n_ic {meta.n_ic}) of {source}: this "
                          f"resolution cannot give the model's features")
    if meta.n_ic < comm.size:
        raise ConfigError(f"IC grid {meta.n_ic}^3 of {source} cannot be cut into {comm.size} slabs")
    nmesh = cfg.output.nmesh if cfg.output.nmesh is not None else eval_nmesh(train_cfg.grid, meta.box)
    if nmesh < comm.size:
        raise ConfigError(f"output.nmesh {nmesh} is smaller than the number of ranks {comm.size}")
    truth = has_truth(meta)
    if cfg.output.compare == "require" and not truth:
        raise ConfigError(f"output.compare=require but {source} has no halos (n_halos = 0, not planted): "
                          f"nothing to compare with; set output.compare=off")
    return {"nmesh": int(nmesh), "kmax": cfg.output.kmax or train_cfg.grid.kmax_lowk,
            "compare": truth and cfg.output.compare != "off", "halos": cfg.halos or train_cfg.halos}


def moment_check(comm, own_moments, train_moments, names, tolerance: float) -> dict:
    """The new box's feature moments (global, over its IC grid) relative to the training ones:
    mean in training standard deviations and the std ratio; warns (with the numbers) for the
    features beyond ``tolerance``."""
    (m_own, s_own), (m_tr, s_tr) = own_moments, train_moments
    mean_s = (np.asarray(m_own, np.float64) - np.asarray(m_tr, np.float64)) / np.asarray(s_tr, np.float64)
    std_s = np.asarray(s_own, np.float64) / np.asarray(s_tr, np.float64)
    report = {"names": list(names), "mean_shift_in_training_std": mean_s, "std_ratio": std_s,
              "tolerance": tolerance, "beyond_tolerance": []}
    for name, m, s in zip(names, mean_s, std_s):
        if abs(m) > tolerance or abs(s - 1) > tolerance:
            report["beyond_tolerance"].append(name)
            if comm.rank == 0:
                log.warning(f"feature {name}: this box's mean differs from the training mean by {m:+.4f} "
                            f"training std and its std is {s:.4f} x the training std (tolerance "
                            f"{tolerance}); the model is applied with the training moments")
    return report


def run(comm, config_path, run_dir, overrides=None, out=None, base_dir=None) -> dict:
    """Run the predict command on ``comm``; returns the summary dict."""
    cfg = load_predict_config(config_path, overrides)
    setup_logging(comm, cfg.run.log_level)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    run_dir = Path(run_dir)
    train_cfg, run_hash = training_run(run_dir)
    name = cfg.output.name or Path(config_path).stem
    out_dir = Path(out) if out is not None else run_dir / "predict" / name
    try:
        sim_section = cfg.simulation.as_training_section()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    specs, _, metas = sources.resolve_checked(comm, sim_section, base_dir)
    spec, meta = specs[0], metas[0]
    configure_torch()  # one thread per rank under MPI, no oneDNN on the CPU (training.ddp)
    ens = load_ensemble(run_dir)
    source = str(spec.get("path", spec["kind"]))
    resolved = check_inputs(comm, cfg, train_cfg, ens.radii, meta, source)
    if comm.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    return _run(comm, cfg, run_dir, out_dir, ens, spec, run_hash, resolved)


def _paint_field(comm, pos, f, nmesh, box, assignment, n_particles):
    """The model field 1 + delta_model = (N_cells / N_part) sum f on this rank's slab (float64)."""
    grid = paint(comm, pos, f, nmesh, box, method=assignment)
    grid *= float(nmesh) ** 3 / float(n_particles)
    return grid


def _lowk_figures(res: dict, kmax: float) -> dict:
    """Means over the bins below kmax of the comparison ratios (NaN when the box has none)."""
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        series = {"pk_ratio_lowk": res["ratio_avg"], "corr_lowk": res["corr_avg"],
                  "uncorr_ratio_lowk": res["uncorr_ratio_avg"], "cross_ratio_lowk": res["P_hm_avg"] / res["P_h"]}
    for key, r in series.items():
        try:
            out[key] = mean_ratio_below(res["k"], r, kmax)
        except ValueError:
            out[key] = float("nan")
    return out


def _run(comm, cfg: PredictConfig, run_dir, out_dir, ens, spec, run_hash, resolved) -> dict:
    timer = StageTimer(comm, track_rss=True)
    ocfg = cfg.output
    nmesh, kmax = resolved["nmesh"], resolved["kmax"]
    label = sources.spec_name(spec)
    names = feature_names(ens.radii, ens.kinds)
    with timer.stage("load"):
        log.info(f"load: {label} ({spec.get('path', spec['kind'])})")
        sim = sources.load(comm, spec)
    meta = sim.meta
    with timer.stage("features"):
        log.info(f"features: {meta.n_particles} particles to their Lagrangian slab, {len(names)} columns "
                 f"on the {meta.n_ic}^3 IC grid (training moments) read out one at a time")
        # the routed positions wait on disk while the columns are computed (12 B per particle)
        scratch = out_dir / "scratch"
        parts, _, own = featurised_particles(comm, sim, ens.radii, ens.kinds, ens.moments,
                                             release_loaded=True, fft_dtype=ens.fft_dtype,
                                             set_aside=spiller(scratch, "routed_pos", comm.rank))
        moments = moment_check(comm, own, ens.moments, names, cfg.checks.moment_tolerance)
    with timer.stage("routing"):
        n_glob = int(global_sum(comm, np.int64(parts.n_local)))
        if n_glob != meta.n_particles:
            raise ValueError(f"{label}: {n_glob} particles routed, metadata says {meta.n_particles}")
    with timer.stage("predict"):
        log.info(f"predict: f of {n_glob} particles, {ens.n_members} members")
        n = parts.n_local
        # as training evaluates: float32 theta and float32 f (4 B per particle and member)
        f_members = np.empty((ens.n_members, n), np.float32) if ocfg.members else None
        f_avg = np.empty(n, np.float32)
        for lo in range(0, n, CHUNK):
            fm = ens.predict_f_members(apply_orthogonaliser(ens.orth, parts.raw[lo:lo + CHUNK]), dtype=np.float32)
            f_avg[lo:lo + CHUNK] = fm.mean(axis=0)
            if f_members is not None:
                f_members[:, lo:lo + CHUNK] = fm
        theta_show = apply_orthogonaliser(ens.orth, parts.raw[:20000])[:, 0] if comm.rank == 0 else None
        parts.raw = None
        sum_f = float(global_sum(comm, f_avg.sum(dtype=np.float64)))
        mean_f = sum_f / n_glob
        parts.restore_positions()  # set aside since the Lagrangian routing: the raw rows are gone now
    remove_empty_dir(comm, scratch)
    # the loaded particle arrays were dropped once routed: planted tracers are the routed particles
    tracers = (true_tracers(comm, sim, resolved["halos"], particles=(parts.pos, parts.f_true))
               if resolved["compare"] else None)
    attrs = {"box": meta.box, "cell": meta.box / nmesh, "assignment": ocfg.assignment,
             "redshift": meta.redshift, "training_config_hash": run_hash, "source": str(meta.source or label),
             "run_dir": str(run_dir.resolve()), "n_particles": meta.n_particles, "sum_f": sum_f,
             "quantity": "1 + delta_model = (nmesh^3 / n_particles) * sum of f painted",
             "n_members": ens.n_members}
    with timer.stage("field"):
        field = _paint_field(comm, parts.pos, f_avg, nmesh, meta.box, ocfg.assignment, meta.n_particles)
        log.info(f"field: {nmesh}^3 {ocfg.assignment} grid, mean {mean_f:.5f}; writing {out_dir / 'model_field.h5'}")
        write_field(comm, out_dir / "model_field.h5", field, nmesh, attrs)
        fft = SlabFFT(comm, nmesh, meta.box, dtype=np.float64)
        pm = power_spectrum(fft, overdensity(comm, field), compensate=ocfg.assignment)
        start, stop = slab_bounds(nmesh, comm.size, comm.rank)
        slice_plane = field[nmesh // 2 - start].copy() if start <= nmesh // 2 < stop else None
        del field, fft
        if ocfg.particle_f:
            order = np.argsort(parts.pid, kind="stable")
            cols = {"pid": parts.pid[order], "f": f_avg[order].astype(np.float32)}
            pattrs = dict(attrs, member_columns=[])
            if f_members is not None:
                cols["f_members"] = f_members[:, order].astype(np.float32)
                pattrs["member_columns"] = ["f_members"]
            write_particles(comm, out_dir / "particles_f.h5", cols, pattrs)
            del cols, order
    comparison = None
    with timer.stage("spectra"):
        if tracers is not None:
            rows = f_members if f_members is not None else f_avg[None]
            res = evaluate_simulation(comm, rows, parts.pos, tracers[0], tracers[1], meta.box, nmesh, kmax)
            if comm.rank == 0:
                write_spectra(out_dir / "spectra.h5", {label: res},
                              {label: {"role": "predict", "source": str(meta.source), "nmesh": nmesh}})
            comparison = {k: v for k, v in res.items()}
            comparison.update(_lowk_figures(res, kmax))
            comparison["true_field"] = tracers[2]
            log.info(f"spectra: P_model/P_h at k < {kmax} = {comparison['pk_ratio_lowk']:.4f}, "
                     f"correlation {comparison['corr_lowk']:.4f}")
    if ocfg.figures:
        figs = out_dir / "figures"
        if slice_plane is not None:  # the rank holding the middle plane draws it
            predict_figures.plot_field_slice(slice_plane, meta.box, figs / "field_slice.png", label)
        if comm.rank == 0:
            predict_figures.plot_power(pm["k"], pm["power"], comparison, figs / "power.png", kmax)
            if comparison is not None:
                plots.plot_spectra({label: comparison}, figs / "pk_ratio.png", kmax)
            plots.plot_f(theta_show, f_avg[:len(theta_show)], figs / "f_vs_theta0.png")
    summary = {
        "n_ranks": comm.size, "run_dir": str(run_dir), "training_config_hash": run_hash,
        "simulation": label, "source": str(meta.source), "box": meta.box, "n_ic": meta.n_ic, "ppd": meta.ppd,
        "redshift": meta.redshift, "n_particles": meta.n_particles, "n_members": ens.n_members,
        "nmesh": nmesh, "assignment": ocfg.assignment, "kmax": kmax, "mean_f": mean_f, "sum_f": sum_f,
        "feature_moments": moments,
        "spectra": {"k": pm["k"], "modes": pm["modes"], "P_model": pm["power"],
                    "compensated": ocfg.assignment},
        "comparison": comparison,
        "pk_ratio_lowk": comparison["pk_ratio_lowk"] if comparison else None,
        "outputs": sorted(p.name for p in [out_dir / "model_field.h5"]
                          + ([out_dir / "particles_f.h5"] if ocfg.particle_f else [])
                          + ([out_dir / "spectra.h5"] if comparison else [])),
        "particles_per_rank": global_min_max_mean(comm, parts.n_local),
        "stage_wall_s": timer.summary(),
        "peak_rss_mb": comm.allreduce(timer.peak_rss_mb(), op=MPI.MAX),
        "stage_peak_rss_mb": timer.rss_summary(),
    }
    write_summary(comm, out_dir / "summary.json", summary, cfg=cfg)
    summary["config"] = to_dict(cfg)
    log.info(f"done: mean f {mean_f:.5f}, P_model/P_h low-k {summary['pk_ratio_lowk']}; outputs in {out_dir}")
    return summary
