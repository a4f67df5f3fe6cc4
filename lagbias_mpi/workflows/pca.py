"""The collective body of ``python -m lagbias_mpi.pca`` (usage and outputs: the command's docstring
and docs/). Called with the communicator; returns the summary dict.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from lagbias_mpi.analysis import figures as analysis_plots
from lagbias_mpi.analysis.pca import analyse_sample, pc_orthogonaliser, sample_mask
from lagbias_mpi.bias.ensemble import Ensemble, load_ensemble, simulation_particles
from lagbias_mpi.bias.evaluate import evaluate_simulation
from lagbias_mpi.bias.model import network_shape
from lagbias_mpi.bias.orthogonalise import Orthogonaliser
from lagbias_mpi.config.loader import ConfigError, apply_overrides, from_dict, to_dict
from lagbias_mpi.config.train import TrainRunConfig
from lagbias_mpi.core.atomic import write_json
from lagbias_mpi.core.logs import get_logger, setup_logging
from lagbias_mpi.io import sources
from lagbias_mpi.io.spectra import read_spectra, write_spectra
from lagbias_mpi.mpi.comm import StageTimer
from lagbias_mpi.training import ddp
from lagbias_mpi.workflows.cli import write_summary

log = get_logger("pca")


def retrain(comm, cfg: TrainRunConfig, pc_orth: Orthogonaliser, ens: Ensemble, out_dir: Path, base_dir: Path,
            timer: StageTimer) -> dict:
    """Train a new ensemble on the inputs of ``pc_orth`` with the run's config and evaluate it as
    ``train`` does. Returns {label: evaluate_simulation result}."""
    from lagbias_mpi.bias.prepare import eval_nmesh, prepare_simulations
    from lagbias_mpi.config.train import config_run_hash
    from lagbias_mpi.training.members import train_ensemble

    tcfg = cfg.train
    ddp.configure_torch(tcfg.threads)
    dtype = getattr(torch, tcfg.dtype)
    train_specs, val_specs = sources.resolve_training(comm, cfg.simulation, base_dir)
    with ddp.process_group(comm):
        device = ddp.device_for(comm)
        sims, _, moments, names = prepare_simulations(comm, timer, cfg, train_specs, val_specs, {}, keep_raw=True)
        for s in sims:
            s.theta = pc_orth.apply(s.parts.raw)
        shape = network_shape(pc_orth.matrix.shape[0], cfg.model)
        with timer.stage("retrain"):
            trs = [s for s in sims if s.role == "train"]
            states = train_ensemble(comm, cfg, trs, [s for s in sims if s.role != "train"], shape,
                                    out_dir / "checkpoints", config_run_hash(cfg) + f"-pc{shape['n_in']}",
                                    dtype, device)[0]
    new = Ensemble(shape, states, pc_orth, moments, names, ens.radii, ens.kinds, tcfg.dtype, to_dict(cfg))
    if comm.rank == 0:
        new.save(out_dir / "model.pt")
    results, meta = {}, {}
    with timer.stage("evaluate"):
        for s in sims:
            nmesh = eval_nmesh(cfg.grid, s.sim.meta.box)
            results[s.label] = evaluate_simulation(comm, new.predict_f_members(s.theta), s.parts.pos, *s.tracers,
                                                   s.sim.meta.box, nmesh, cfg.grid.kmax_lowk)
            meta[s.label] = {"role": s.role, "source": str(s.spec.get("path", "")), "nmesh": nmesh}
            log.info(f"re-trained on {shape['n_in']} PCs, {s.label}: P_model/P_h low k = "
                     f"{results[s.label]['pk_ratio_lowk']:.4f}")
    if comm.rank == 0:
        write_spectra(out_dir / "spectra.h5", results, meta)
    return results


def load_run(run_dir: Path, overrides: list[str] | None = None) -> tuple[TrainRunConfig, Ensemble, dict]:
    """Config (with ``key=value`` overrides), ensemble and summary of a training run; clear errors
    for a missing piece."""
    for name in ("config.yaml", "model.pt"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"--run {run_dir}: no {name} (is it a finished `train` run directory?)")
    data = apply_overrides(yaml.safe_load((run_dir / "config.yaml").read_text()), overrides)
    cfg = from_dict(TrainRunConfig, data)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    return cfg, load_ensemble(run_dir), summary


def run(comm, run_dir, retrain_k=None, n_sample=1_000_000, seed=2023, out=None, base_dir=None,
        overrides=None) -> dict:
    """The whole pca command on ``comm``; returns the summary dict. ``overrides`` (``key=value``)
    change the run's config (its simulations and the re-training)."""
    run_dir = Path(run_dir)
    cfg, ens, run_summary = load_run(run_dir, overrides)
    setup_logging(comm, cfg.run.log_level)
    n_in = ens.shape["n_in"]
    if retrain_k is not None and not 1 <= retrain_k <= n_in:
        raise ConfigError(f"--retrain {retrain_k}: must be between 1 and the number of inputs {n_in}")
    if n_sample < 10:
        raise ConfigError(f"--n-sample {n_sample}: need at least 10 particles")
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    out_dir = Path(out) if out is not None else run_dir / "pca"
    timer = StageTimer(comm)
    train_specs, _ = sources.resolve_training(comm, cfg.simulation, base_dir)
    sampled = []
    for spec in train_specs:  # n_sample split evenly over the training boxes
        with timer.stage("features"):
            sim = sources.load(comm, spec)
            parts = simulation_particles(comm, sim, ens)
            keep = sample_mask(parts.pid, sim.meta.n_particles, -(-n_sample // len(train_specs)), seed)
            sampled.append(parts.raw[keep])
            del sim, parts
    with timer.stage("pca"):
        res = analyse_sample(comm, ens, np.concatenate(sampled))
        del sampled
    vals = res["eigenvalues"]
    log.info(f"pca: {res['n_sampled']} particles sampled; eigenvalues {np.array2string(vals, precision=4)} "
             f"(fractions {np.array2string(vals / vals.sum(), precision=3)}); PC0 peak of f at {res['pc0_peak']:.3f}")
    figs = out_dir / "figures"
    if comm.rank == 0 and cfg.run.figures:
        analysis_plots.plot_pc_planes(res["local_pcs"], res["local_f"], figs / "pc_planes.png")
        analysis_plots.plot_pc_coefficients(res["coefficients"], ens.feature_names, figs / "pc_coefficients.png",
                                            n_pc=min(2, n_in))
        analysis_plots.plot_f_vs_pc0(res["pc0_centres"], res["pc0_mean_f"], figs / "f_vs_pc0.png",
                                     run_dir.name, res["pc0_peak"])
    summary = {
        "n_ranks": comm.size,
        "run": str(run_dir),
        "n_sampled": res["n_sampled"],
        "pc_eigenvalues": vals,
        "pc_eigenvalue_fractions": vals / vals.sum(),
        "pc_vectors": res["U"],
        "pc_coefficients": res["coefficients"],
        "feature_names": ens.feature_names,
        "pc0_peak": res["pc0_peak"],
        "pc0_bin_centres": res["pc0_centres"],
        "pc0_mean_f": res["pc0_mean_f"],
        "pk_ratio_lowk_val_original": run_summary.get("pk_ratio_lowk_val"),
        "pk_ratio_lowk_val_retrained": None,
        "retrain_k": retrain_k,
    }
    if retrain_k is not None:
        rdir = out_dir / f"retrain_{retrain_k}"
        pc_orth = pc_orthogonaliser(ens.orth, res["U"], vals, retrain_k)
        new = retrain(comm, cfg, pc_orth, ens, rdir, base_dir, timer)
        val = next((k for k in new if k != "train"), None)
        summary["pk_ratio_lowk_val_retrained"] = new[val]["pk_ratio_lowk"] if val else None
        summary["pk_ratio_lowk_train_retrained"] = new["train"]["pk_ratio_lowk"]
        summary["pk_ratio_lowk_members_retrained"] = {k: r["pk_ratio_lowk_members"] for k, r in new.items()}
        if comm.rank == 0 and cfg.run.figures and (run_dir / "spectra.h5").is_file():
            analysis_plots.plot_retrain(read_spectra(run_dir / "spectra.h5"), new, figs / f"retrain_{retrain_k}.png",
                                        retrain_k, cfg.grid.kmax_lowk)
    write_summary(comm, out_dir / "summary.json", summary, timer, cfg)
    if comm.rank == 0 and run_summary:  # the run's own summary names its PCA result too (thin mass ranges: pc0_peak)
        write_json(run_dir / "summary.json", {**run_summary, "pc0_peak": res["pc0_peak"],
                                              "pc_eigenvalues": vals, "pca_dir": str(out_dir)})
    comm.Barrier()  # the outputs exist on return, on every rank
    log.info(f"done: outputs in {out_dir}; P_model/P_h low k val original {summary['pk_ratio_lowk_val_original']}, "
             f"re-trained {summary['pk_ratio_lowk_val_retrained']}")
    return summary
