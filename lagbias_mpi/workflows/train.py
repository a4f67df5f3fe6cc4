"""The collective body of ``python -m lagbias_mpi.train`` (usage and outputs: the command's docstring
and docs/). Called with the communicator; returns the summary dict.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from mpi4py import MPI

from lagbias_mpi.analysis import plots
from lagbias_mpi.bias.ensemble import CHUNK as FORWARD_CHUNK
from lagbias_mpi.bias.ensemble import Ensemble
from lagbias_mpi.bias.evaluate import evaluate_simulation, member_health, member_verdicts
from lagbias_mpi.bias.model import network_shape
from lagbias_mpi.bias.prepare import (
    _exchange_summary,
    validate_inputs,
    eval_nmesh,
    prepare_simulation,
    prepare_training,
    sim_labels,
)
from lagbias_mpi.config.loader import to_dict
from lagbias_mpi.config.train import config_run_hash, load_train_config
from lagbias_mpi.core.atomic import atomic_path
from lagbias_mpi.core.logs import get_logger, rank_formatter, setup_logging
from lagbias_mpi.core.spill import remove_empty_dir
from lagbias_mpi.io.spectra import write_spectra
from lagbias_mpi.mpi.comm import StageTimer, global_min_max_mean
from lagbias_mpi.training import ddp
from lagbias_mpi.training.loop import bare_mlp_rate
from lagbias_mpi.training.members import train_ensemble, validation_losses
from lagbias_mpi.training.stopping import StopControl
from lagbias_mpi.workflows.cli import write_summary

log = get_logger("train")


def _add_file_log(comm, path: Path):
    if comm.rank != 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(rank_formatter(comm))
    logging.getLogger("lagbias_mpi").addHandler(handler)
    return handler


def run(comm, config_path, overrides=None, out=None, resume=False, stop_after_epochs=None,
        base_dir=None, stop_after_steps=None, stop: StopControl | None = None) -> dict | None:
    """Run the whole training command on ``comm``; returns the summary dict, or None when training
    stopped early (SIGTERM/SIGUSR1, or the test budgets ``stop_after_epochs``/``stop_after_steps``)
    after writing checkpoints that ``resume`` continues from. ``stop``: the :class:`StopControl` to
    use (default: a new one with the two budgets)."""
    cfg = load_train_config(config_path, overrides)
    setup_logging(comm, cfg.run.log_level)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    name = cfg.run.name or Path(config_path).stem
    run_dir = Path(out) if out is not None else base_dir / "runs" / name
    train_specs, val_specs = validate_inputs(comm, cfg, base_dir)
    if comm.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    handler = _add_file_log(comm, run_dir / "train.log")
    try:
        with ddp.process_group(comm):
            stop = stop or StopControl(stop_after_epochs, stop_after_steps)
            return _run(comm, cfg, run_dir, train_specs, val_specs, resume, stop)
    finally:
        if handler is not None:
            logging.getLogger("lagbias_mpi").removeHandler(handler)
            handler.close()


def _positions_aside(boxes, directory: Path, rank: int) -> None:
    """Set every prepared box's positions aside in ``directory`` (a function: no loop variable
    outlives it to keep a box alive after the caller drops its list)."""
    for box in boxes:
        box.set_positions_aside(directory, rank)


def drop_spilled(boxes) -> None:
    """Remove the files of the boxes' positions set aside (a run that stops before evaluating)."""
    for box in boxes:
        box.drop_spilled()


def figs_dir(run_dir: Path) -> Path:
    return run_dir / "figures"


def member_f_columns(ens, theta: np.ndarray) -> dict[str, np.ndarray]:
    """Every member's f (float32, 4 B per member per particle) at the inputs ``theta``, one 1-d array
    per member (``f0``, ``f1``, ...: separate arrays, so that the evaluation's routing can consume them)."""
    cols = {f"f{m}": np.empty(len(theta), np.float32) for m in range(ens.n_members)}
    for lo in range(0, len(theta), FORWARD_CHUNK):
        fm = ens.predict_f_members(theta[lo:lo + FORWARD_CHUNK], dtype=np.float32)
        for m in range(ens.n_members):
            cols[f"f{m}"][lo:lo + FORWARD_CHUNK] = fm[m]
    return cols


def healthy_rows(result: dict) -> list[int]:
    """Members (rows of an evaluation) that pass :func:`member_health`; all when none does."""
    rows = [i for i, (p, m) in enumerate(zip(result["pk_ratio_lowk_members"], result["mean_f_members"]))
            if member_health(p, m)["ok"]]
    return rows or list(range(len(result["pk_ratio_lowk_members"])))


def _evaluate_box(comm, timer, cfg, ens, s, results: dict, meta: dict, average_rows=None) -> None:
    """Spectra of the ensemble on one prepared box into ``results[s.label]`` (collective). The box is
    used up: its inputs, ids and cells are dropped once f is computed, and the members' f are consumed
    by the routing to the evaluation slabs (pos 12 + 4 M B per particle arrive)."""
    with timer.stage("evaluate"):
        nmesh = eval_nmesh(cfg.grid, s.sim.meta.box)
        f_cols = member_f_columns(ens, s.theta)
        s.theta = s.parts.theta = s.parts.pid = s.parts.cell = None
        s.restore_positions()  # set aside during training: read back once the inputs are gone
        results[s.label] = evaluate_simulation(comm, f_cols, s.parts.pos, *s.tracers, s.sim.meta.box,
                                               nmesh, cfg.grid.kmax_lowk, average_rows=average_rows)
        meta[s.label] = {"role": s.role, "source": str(s.spec.get("path", "")), "nmesh": nmesh,
                         "truth": "halos" if s.parts.f_true is None else "planted f_true"}
        log.info(f"evaluate {s.label}: P_model/P_h at k < {cfg.grid.kmax_lowk} = "
                 f"{results[s.label]['pk_ratio_lowk']:.4f} (mode-weighted "
                 f"{results[s.label]['pk_ratio_lowk_modes']:.4f}), mean f {results[s.label]['mean_f']:.5f}")


def _memory_summary(comm, timer, particles_local: int) -> dict:
    """Peak RSS per stage (max over ranks), the per-rank baseline before the first stage, and
    ``memory_bytes_per_particle``: max over ranks of (peak RSS of the run - baseline) / the rank's
    training particles. It includes the per-grid-cell terms (IC features, training and evaluation
    grids), so it is an upper bound of the per-particle slope (docs/supercomputer.md measures that)."""
    peak = timer.peak_rss_mb()
    per_particle = (peak - timer.baseline_rss_mb) * 2.0**20 / max(particles_local, 1)
    return {"peak_rss_mb": comm.allreduce(peak, op=MPI.MAX),
            "stage_peak_rss_mb": timer.rss_summary(),
            "stage_rss_trace_mb": timer.rss_trace(),
            "baseline_rss_mb": comm.allreduce(timer.baseline_rss_mb, op=MPI.MAX),
            "memory_bytes_per_particle": comm.allreduce(per_particle, op=MPI.MAX)}


def _balance(stats: dict) -> dict:
    """Min/mean/max over ranks plus ``max_over_mean`` (1 = perfect balance)."""
    return {**stats, "max_over_mean": stats["max"] / stats["mean"] if stats["mean"] else float("nan")}


def _polish_summary(history: dict) -> dict | None:
    """A member's full-batch phase (train.polish) for summary.json: the whole set's objective before
    and after, evaluations, the check kept, wall time, why it ended early (None: it did not run)."""
    rec = history.get("polish")
    if rec is None:
        return None
    return {"set_loss_before": rec["train_loss"][0], "set_loss_after": rec["train_loss"][-1],
            "evaluations": rec["evaluations"][-1], "kept_check": rec["kept"],
            "wall_s": float(np.sum(rec["wall_s"])), "stopped": rec.get("stopped")}


@dataclass
class TrainedMembers:
    """What :func:`train_ensemble` returns, with the bare-MLP rate measured after it."""
    states: list
    histories: list
    batch_info: dict
    train_bytes: int
    failures: dict
    bare_rate: float


@dataclass
class Evaluated:
    """The ensemble after the training boxes' evaluation: ``ens`` averages the members that passed the
    flat/diverged check, ``ens_all`` holds every trained member (for the validation losses)."""
    ens: Ensemble
    ens_all: Ensemble
    results: dict
    meta: dict
    members_ok: list
    members_kept: list
    balance: dict


def _run(comm, cfg, run_dir, train_specs, val_specs, resume, stop: StopControl):
    timer = StageTimer(comm, track_rss=True)
    if comm.rank == 0:
        with atomic_path(run_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if cfg.run.fail_on_rank is not None and comm.rank == cfg.run.fail_on_rank:
        raise RuntimeError(f"run.fail_on_rank={cfg.run.fail_on_rank}: injected failure on rank {comm.rank}")
    ddp.configure_torch(cfg.train.threads)
    dtype = getattr(torch, cfg.train.dtype)
    device = ddp.device_for(comm)
    exch: dict = {}
    # what a stage does not need waits on disk: positions from the features to the Eulerian routing,
    # and the training box's while the members train (12 B per particle each time)
    scratch = Path(cfg.run.scratch_dir) if cfg.run.scratch_dir else run_dir / "scratch"
    trs, orth, moments, names = prepare_training(comm, timer, cfg, train_specs, exch, scratch=scratch)
    shape = network_shape(orth.matrix.shape[0], cfg.model)
    trained = train_members(comm, timer, cfg, trs, shape, run_dir, scratch, dtype, device, resume, stop)
    if trained is None:
        remove_empty_dir(comm, scratch)
        return None
    done = _evaluate_training_boxes(comm, timer, cfg, run_dir, trs, trained, shape, (orth, moments, names))
    del trs  # the training boxes are freed before any validation box is prepared
    labels = sim_labels(len(train_specs), len(val_specs))
    val_labels = labels[len(train_specs):]
    val_losses = _validate(comm, timer, cfg, val_specs, val_labels, (orth, moments), exch, scratch, done,
                           dtype, device)
    remove_empty_dir(comm, scratch)
    done.ens_all = None
    histories = trained.histories
    for m, h in enumerate(histories):  # validation after training: the last epoch's entry
        if val_losses and h["val_loss"]:
            h["val_loss"][-1] = float(np.mean([vl[m][0] for vl in val_losses]))
            h["val_mean_f"][-1] = float(np.mean([vl[m][1] for vl in val_losses]))
    if comm.rank == 0:
        write_spectra(run_dir / "spectra.h5", done.results, done.meta)
    if comm.rank == 0 and cfg.run.figures:
        plots.plot_spectra(done.results, figs_dir(run_dir) / "pk_ratio.png", cfg.grid.kmax_lowk)
        plots.plot_loss(histories, figs_dir(run_dir) / "loss.png")
    summary = _summary(comm, timer, cfg, trained, done, exch, shape, (orth, names),
                       labels[0], val_labels[0] if val_labels else None, len(train_specs))
    write_summary(comm, run_dir / "summary.json", summary, cfg=cfg)
    if summary["mean_f_val"] is not None:
        log.info(f"mean f on the validation box {summary['mean_f_val']:.5f}; a perfect model: "
                 f"{summary['mean_f_val_expected']:.5f} +- {summary['mean_f_val_expected_shot_noise']:.2%} "
                 f"(the true field's shot noise in the two boxes)")
    log.info(f"done: final train loss {summary['final_train_loss']:.6g}, val loss {summary['final_val_loss']:.6g}, "
             f"mean f {summary['mean_f']:.5f}, P ratio low-k train {summary['pk_ratio_lowk_train']:.4f} "
             f"val {summary['pk_ratio_lowk_val']}, {summary['train_particles_per_s']:.3g} particles/s "
             f"({100 * summary['train_vs_bare']:.0f}% of bare MLP); run directory {run_dir}")
    return summary


def train_members(comm, timer, cfg, trs, shape, run_dir, scratch, dtype, device, resume,
                  stop: StopControl) -> TrainedMembers | None:
    """The train stage: the training boxes' positions go to ``scratch`` while the ensemble trains
    (checkpoints in ``run_dir/checkpoints``); None when training stopped early or failed (the files
    set aside are removed)."""
    with timer.stage("train"):
        _positions_aside(trs, scratch, comm.rank)  # on disk until the evaluation (12 B per particle)
        trained = None
        try:
            with stop.handlers():  # SIGTERM/SIGUSR1: finish the step, checkpoint, stop (see stopping.py)
                trained = train_ensemble(comm, cfg, trs, [], shape, run_dir / "checkpoints", config_run_hash(cfg),
                                         dtype, device, resume, stop)
        finally:
            if trained is None:  # stopped or failed: the files set aside go
                drop_spilled(trs)
        if trained is None:
            return None
        states, histories, batch_info, train_bytes, failures = trained
        bare = bare_mlp_rate(comm, shape, int(round(batch_info["n_selected"] / batch_info["n_batches"])),
                             cfg.train, dtype, device)
    return TrainedMembers(states, histories, batch_info, train_bytes, failures, bare)


def _evaluate_training_boxes(comm, timer, cfg, run_dir, trs, trained: TrainedMembers, shape,
                             transform) -> Evaluated:
    """Evaluate every member on the first training box, keep the healthy ones in the ensemble (saved as
    ``model.pt``), evaluate that ensemble on the other training boxes, plot f. The boxes are used up."""
    orth, moments, names = transform
    tcfg = cfg.train

    def ensemble(states):
        return Ensemble(shape, states, orth, moments, names, cfg.features.radii, cfg.features.kinds,
                        tcfg.dtype, to_dict(cfg))

    ens = ens_all = ensemble(trained.states)  # every trained member, in the order of the histories
    results, meta = {}, {}
    balance = {"n_particles": sum(t.sim.meta.n_particles for t in trs),
               "particles_local": sum(t.parts.n_local for t in trs),
               "cells_local": sum(int(t.ownership.counts()[comm.rank]) for t in trs)}
    first = trs[0]
    n_show = min(first.parts.n_local, 20000)
    show = ((first.theta[:n_show].copy(), None if first.parts.f_true is None else first.parts.f_true[:n_show].copy())
            if comm.rank == 0 and n_show and cfg.run.figures else None)
    log.info("evaluate: every member's f on all particles, CIC spectra, the average of the healthy members")
    _evaluate_box(comm, timer, cfg, ens, first, results, meta, average_rows=healthy_rows)
    members_ok, trained_ids = member_verdicts(tcfg.ensemble, trained.failures, results[first.label])
    del first
    keep = [i for i in trained_ids if members_ok[i]["ok"]]
    if keep and len(keep) < len(trained.states):
        log.warning(f"ensemble average of members {keep} only (the others: "
                    f"{[(j, m['reason']) for j, m in enumerate(members_ok) if not m['ok']]})")
        ens = ensemble([trained.states[trained_ids.index(i)] for i in keep])
    elif not keep:
        log.error("no member passed the flat/diverged check; the ensemble keeps all trained members")
    if comm.rank == 0:
        ens.save(run_dir / "model.pt")
    for i in range(1, len(trs)):  # (no loop variable keeps a box alive after the caller drops ``trs``)
        _evaluate_box(comm, timer, cfg, ens, trs[i], results, meta)
    if show is not None:
        f_show = ens.predict_f_members(show[0]).mean(axis=0)
        plots.plot_f(show[0][:, 0], f_show, figs_dir(run_dir) / "f_vs_theta0.png", show[1])
    return Evaluated(ens, ens_all, results, meta, members_ok, keep or trained_ids, balance)


def _validate(comm, timer, cfg, val_specs, val_labels, transform, exch, scratch, done: Evaluated,
              dtype, device) -> list:
    """Prepare and evaluate the validation boxes one at a time (each freed before the next): every
    trained member's validation loss and mean f per box, and the ensemble's spectra into ``done``."""
    orth, moments = transform
    val_losses = []
    for spec, label in zip(val_specs, val_labels):
        v = prepare_simulation(comm, timer, cfg, spec, label, orth, moments, exch, scratch=scratch)
        _positions_aside([v], scratch, comm.rank)  # the validation losses do not need them either
        with timer.stage("evaluate"):
            val_losses.append(validation_losses(comm, cfg, v, done.ens_all.members, dtype, device))
        _evaluate_box(comm, timer, cfg, done.ens, v, done.results, done.meta)
        del v
    return val_losses


def _expected_mean_f_noise(done: Evaluated, tr_label, val_label) -> float | None:
    """Relative shot noise of ``mean_f_val_expected``: hypot of the two boxes' ``truth_shot_noise``
    when their true fields are halos, 0 when they are planted (exact) truths, None without validation."""
    if val_label is None:
        return None
    if any(done.meta[label]["truth"] != "halos" for label in (tr_label, val_label)):
        return 0.0
    return float(np.hypot(done.results[tr_label]["truth_shot_noise"], done.results[val_label]["truth_shot_noise"]))


def _summary(comm, timer, cfg, trained: TrainedMembers, done: Evaluated, exch, shape, transform,
             tr_label, val_label, n_train_sims) -> dict:
    """summary.json's content (collective: the balance and memory figures are reduced over ranks)."""
    orth, names = transform
    tcfg, histories, batch_info, results = cfg.train, trained.histories, trained.batch_info, done.results
    epoch_wall = [float(np.sum(h["step_wall_s"])) for h in histories]
    n_epochs_total = sum(len(h["epoch"]) for h in histories)
    train_rate = (batch_info["n_selected"] * n_epochs_total / max(sum(epoch_wall), 1e-12))
    return {
        "n_ranks": comm.size,
        "n_particles": done.balance["n_particles"],
        "n_train_sims": n_train_sims,
        "kspace_k_cut": tcfg.kspace_loss.kcut(cfg.features.radii) if tcfg.kspace_loss.enabled else None,
        "n_selected": batch_info["n_selected"],
        "n_batches": batch_info["n_batches"],
        "epochs": tcfg.epochs,
        "ensemble": tcfg.ensemble,
        "final_train_loss": float(np.mean([h["train_loss"][-1] for h in histories])),
        "final_val_loss": float(np.mean([h["val_loss"][-1] for h in histories])),
        "mean_f": results[tr_label]["mean_f"],
        "mean_f_val": results[val_label]["mean_f"] if val_label else None,
        # what a perfect model gives on the validation box: its true field's weight per particle
        # relative to the training box's (the integral constraint normalises f on the training box)
        "mean_f_val_expected": (results[val_label]["truth_per_particle"] / results[tr_label]["truth_per_particle"]
                                if val_label else None),
        # its relative uncertainty: the halos' shot noise in both boxes' summed halo mass (a model of the
        # mean halo mass given the density cannot know the draw), 0 for a planted (exact) truth
        "mean_f_val_expected_shot_noise": _expected_mean_f_noise(done, tr_label, val_label),
        "pk_ratio_lowk_train": results[tr_label]["pk_ratio_lowk"],
        "pk_ratio_lowk_val": results[val_label]["pk_ratio_lowk"] if val_label else None,
        "pk_ratio_lowk_train_modes": results[tr_label]["pk_ratio_lowk_modes"],
        "pk_ratio_lowk_val_modes": results[val_label]["pk_ratio_lowk_modes"] if val_label else None,
        "members_ok": done.members_ok,
        "polish": [_polish_summary(h) for h in histories] if tcfg.polish.evaluations > 0 else None,
        "members_in_ensemble": done.members_kept,
        "sampling_frac": batch_info.get("frac"),
        "pk_ratio_lowk_members": {k: r["pk_ratio_lowk_members"] for k, r in results.items()},
        "stage_wall_s": timer.summary(),
        "epoch_wall_s": [h["epoch_wall_s"] for h in histories],
        "bytes_per_particle": comm.allreduce(trained.train_bytes, op=MPI.SUM) / max(batch_info["n_selected"], 1),
        "train_particles_per_s": train_rate,
        "bare_mlp_particles_per_s": trained.bare_rate,
        "train_vs_bare": train_rate / trained.bare_rate,
        "exchange_bytes": _exchange_summary(comm, exch),
        **_memory_summary(comm, timer, done.balance["particles_local"]),
        "particles_per_rank": _balance(global_min_max_mean(comm, done.balance["particles_local"])),
        "cells_per_rank": global_min_max_mean(comm, done.balance["cells_local"]),
        "occupied_cells_per_rank": global_min_max_mean(comm, batch_info["cells_local"]),
        "loss_history": histories,
        "n_inputs": shape["n_in"],
        "feature_names": names,
        "orthogonaliser_eigenvalues": orth.eigenvalues,
        "backend": ddp.default_backend() if comm.size > 1 else "none (1 rank)",
    }
