"""The collective body of ``python -m lagbias_mpi.lstsq`` (usage and outputs: the command's docstring
and docs/). Called with the communicator; returns the summary dict.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lagbias_mpi.analysis import figures as analysis_plots
from lagbias_mpi.analysis.lstsq import (
    bin_means,
    fit_binning,
    loss_of,
    normal_equations,
    solve_all,
)
from lagbias_mpi.bias.ensemble import load_ensemble, simulation_particles
from lagbias_mpi.bias.evaluate import evaluate_simulation
from lagbias_mpi.bias.features import feature_names
from lagbias_mpi.bias.particles import eulerian_route, featurised_particles
from lagbias_mpi.bias.prepare import eval_nmesh
from lagbias_mpi.bias.routing import slab_to_owners
from lagbias_mpi.bias.truth import delta_slab, true_tracers
from lagbias_mpi.config.loader import ConfigError, load_config
from lagbias_mpi.config.lstsq import LstsqRunConfig
from lagbias_mpi.core.logs import get_logger, setup_logging
from lagbias_mpi.io import sources
from lagbias_mpi.mpi.comm import StageTimer
from lagbias_mpi.training.sampling import resolve_frac
from lagbias_mpi.workflows.cli import write_summary

log = get_logger("lstsq")


def _check_inputs(comm, cfg: LstsqRunConfig, nn_run, base_dir: Path):
    train_specs, val_specs, metas = sources.resolve_checked(comm, cfg.simulation, base_dir)
    train_spec = train_specs[0]  # least squares on the first training box
    specs = [train_spec, *val_specs]
    for spec, meta in zip(specs, [metas[0], *metas[len(train_specs):]]):
        if cfg.radius < meta.box / meta.n_ic * (1 - 1e-9):
            raise ConfigError(f"lstsq scale {cfg.radius} Mpc/h is below the IC grid spacing "
                              f"{meta.box / meta.n_ic:.4g} Mpc/h of {spec.get('path')}")
        if meta.n_ic < comm.size or eval_nmesh(cfg.grid, meta.box) < comm.size:
            raise ConfigError(f"grids of {spec.get('path')} too small for {comm.size} ranks")
    if nn_run is not None and not (Path(nn_run) / "model.pt").is_file():
        raise ConfigError(f"--nn-run {nn_run}: no model.pt there")
    return train_spec, val_specs


def run(comm, config_path, overrides=None, nn_run=None, out=None, base_dir=None) -> dict:
    """The whole lstsq command on ``comm``; returns the summary dict."""
    cfg = load_config(LstsqRunConfig, config_path, list(overrides or []))
    setup_logging(comm, cfg.run.log_level)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    train_spec, val_specs = _check_inputs(comm, cfg, nn_run, base_dir)
    name = cfg.run.name or Path(config_path).stem
    if out is not None:
        out_dir = Path(out)
    else:
        out_dir = Path(nn_run) / "lstsq" if nn_run else base_dir / "runs" / name / "lstsq"
    timer = StageTimer(comm)
    lcfg, radius = cfg.lstsq, cfg.radius
    names = feature_names((radius,), ("delta", "lap"))
    ens = load_ensemble(nn_run) if nn_run is not None else None
    results, nn_results, fig2 = {}, {}, {}
    binning = f_bins = ne = moments = None
    for i, spec in enumerate([train_spec, *val_specs]):
        label = "train" if i == 0 else ("val" if len(val_specs) == 1 else f"val{i - 1}")
        with timer.stage("load"):
            sim = sources.load(comm, spec)
        with timer.stage("features"):
            parts, moments, _ = featurised_particles(comm, sim, (radius,), ("delta", "lap"), moments,
                                                     fft_dtype=cfg.features.fft_dtype)
        tpos, tw, what = true_tracers(comm, sim, cfg.halos)
        if i == 0:
            with timer.stage("fit"):
                binning = fit_binning(comm, parts.raw, (0, 1), lcfg)
                n_grid = int(round(sim.meta.box / cfg.grid.cell))
                eparts = eulerian_route(comm, parts, n_grid, consume=False)
                own = eparts.ownership
                truth = slab_to_owners(comm, delta_slab(comm, tpos, tw, n_grid, sim.meta.box, "ngp"), n_grid, own)
                ne = normal_equations(comm, eparts.cell, eparts.pid, binning.bins(eparts.raw), binning.n_bins,
                                      lambda c: own.local_values(truth, comm.rank, c), n_grid**3,
                                      sim.meta.n_particles,
                                      resolve_frac(cfg.sampling.frac, cfg.sampling.per_cell, sim.meta.n_particles, n_grid**3),
                                      cfg.train.seed, cfg.train.ensemble)
                f_bins = solve_all(comm, ne, lcfg.constraint_weight)
                del eparts, truth
            losses = [loss_of(ne, m, f_bins[m]) for m in range(len(f_bins))]
            log.info(f"lstsq: {binning.n_bins} bins, {cfg.train.ensemble} sub-samples, {what}; loss per "
                     f"sub-sample {np.array2string(np.array(losses), precision=5)}")
        bins = binning.bins(parts.raw)
        if i == 0:
            fig2["delta_centre"] = bin_means(comm, bins, parts.raw[:, 0], binning.n_bins)
        nmesh = eval_nmesh(cfg.grid, sim.meta.box)
        with timer.stage("evaluate"):
            results[label] = evaluate_simulation(comm, f_bins[:, bins], parts.pos, tpos, tw, sim.meta.box,
                                                 nmesh, cfg.grid.kmax_lowk)
            log.info(f"evaluate {label}: lstsq P_model/P_h at k < {cfg.grid.kmax_lowk} = "
                     f"{results[label]['pk_ratio_lowk']:.4f}")
            if ens is not None:
                nparts = simulation_particles(comm, sim, ens)
                if not np.array_equal(nparts.pid, parts.pid):
                    raise RuntimeError("lstsq: NN and lstsq particles are not in the same order")
                f_nn = ens.predict_f_members(ens.inputs(nparts.raw, standardised=True))
                nn_results[label] = evaluate_simulation(comm, f_nn, nparts.pos, tpos, tw, sim.meta.box, nmesh,
                                                        cfg.grid.kmax_lowk)
                if i == 0:
                    fig2["f_nn"] = bin_means(comm, bins, f_nn.mean(axis=0), binning.n_bins)
                log.info(f"evaluate {label}: NN P_model/P_h = {nn_results[label]['pk_ratio_lowk']:.4f}")
                del nparts
        del parts, sim
    val_label = next((k for k in results if k != "train"), None)
    if comm.rank == 0 and cfg.run.figures:
        analysis_plots.plot_lstsq(binning, f_bins, fig2, results, nn_results, out_dir / "figures" / "lstsq_fig2.png",
                                  radius, cfg.grid.kmax_lowk)
    summary = {
        "n_ranks": comm.size,
        "radius": radius,
        "n_bins": binning.n_bins,
        "sub_samples": cfg.train.ensemble,
        "pk_ratio_lowk_val_lstsq": results[val_label]["pk_ratio_lowk"] if val_label else None,
        "pk_ratio_lowk_val_lstsq_members": results[val_label]["pk_ratio_lowk_members"] if val_label else None,
        "pk_ratio_lowk_train_lstsq": results["train"]["pk_ratio_lowk"],
        "pk_ratio_lowk_val_nn": nn_results[val_label]["pk_ratio_lowk"] if (val_label and nn_results) else None,
        "pk_ratio_lowk_train_nn": nn_results["train"]["pk_ratio_lowk"] if nn_results else None,
        "nn_run": str(nn_run) if nn_run else None,
        "loss_per_subsample": [loss_of(ne, m, f_bins[m]) for m in range(len(f_bins))],
        "mean_f": results["train"]["mean_f"],
        "min_f": float(f_bins.min()),
        "f_bins": f_bins.mean(axis=0),
        "f_bins_members": f_bins,
        "bin_counts": ne.counts,
        "binning": binning.to_dict(),
        "feature_names": names,
        "moments": {"mean": moments[0], "std": moments[1]},
    }
    write_summary(comm, out_dir / "summary.json", summary, timer, cfg)
    log.info(f"done: P_model/P_h low k val lstsq {summary['pk_ratio_lowk_val_lstsq']}, "
             f"NN {summary['pk_ratio_lowk_val_nn']}; outputs in {out_dir}")
    return summary
