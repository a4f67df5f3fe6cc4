"""``python -m lagbias_mpi.train``: train, evaluate and save an ensemble of f(theta) networks.

    mpirun -n P python -m lagbias_mpi.train --config FILE.yaml [--set key=value ...] [--out DIR] [--resume]

Stages (all collective, timed): features (IC smoothing + standardisation), routing (Lagrangian
routing + feature readout, Eulerian routing, true field on the training grid), orthogonalise, train
(DDP, per member), evaluate (spectra on the evaluation grid). The run directory layout is described
in docs/run_directory.md.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from mpi4py import MPI

from . import ddp, pipeline, plots, sources
from .cli import add_config_arguments, run_command, write_summary
from .config import ConfigError, config_hash, load_config, to_dict
from .ensemble import Ensemble
from .evaluate import evaluate_simulation, write_spectra
from .features import feature_names
from .logs import _RankFormatter, get_logger, setup_logging
from .orthogonalise import fit as fit_orthogonaliser
from .output import atomic_path
from .parallel import global_min_max_mean, global_sum, StageTimer
from .simdata import SimulationFileError
from .train_config import TrainConfig, TrainRunConfig
from .kspace import build_field_set
from .stopping import StopControl, StopRequested
from .trainer import BatchSet, bare_mlp_rate, build_batches, train_member

log = get_logger("train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lagbias_mpi.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p, "training config YAML")
    p.add_argument("--out", default=None, help="run directory (default runs/<run.name or config stem>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoints")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop (as if killed) after this many epochs in this invocation; for testing --resume")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop (as on SIGTERM: mid-epoch checkpoint) after this many optimiser steps; for testing")
    return p.parse_args(argv)


def load_train_config(path, overrides=None) -> TrainRunConfig:
    """Validated training config from YAML + ``key=value`` overrides."""
    return load_config(TrainRunConfig, path, list(overrides or []))


def config_run_hash(cfg: TrainRunConfig) -> str:
    """Hash of the config without ``run``; the beyond-the-paper keys at their defaults are left out,
    so that runs checkpointed before they existed can still be resumed."""
    d = to_dict(cfg)
    d.pop("run")
    if not d["simulation"].get("train_realisations"):
        d["simulation"].pop("train_realisations", None)
    defaults = to_dict(TrainConfig())
    for key in ("kspace_loss", "warmup_steps"):
        if d["train"].get(key) == defaults[key]:
            d["train"].pop(key)
    return config_hash(d)


def _validate_inputs(comm, cfg: TrainRunConfig, base_dir: Path):
    """Resolve the simulations and check what can be checked before any heavy work."""
    train_specs, val_specs, metas = sources.resolve_checked(comm, cfg.simulation, base_dir)
    radii = cfg.features.radii
    for spec, meta in zip([*train_specs, *val_specs], metas):
        cell = meta.box / meta.n_ic
        if min(radii) < cell * (1 - 1e-9):
            raise ConfigError(f"features.scales: smoothing scale {min(radii)} Mpc/h is below the IC grid "
                              f"spacing {cell:.4g} Mpc/h of {spec.get('path')}")
        n_grid = int(round(meta.box / cfg.grid.cell))
        if n_grid < 1:
            raise ConfigError(f"grid.cell {cfg.grid.cell} is larger than the box {meta.box}")
        if meta.n_ic < comm.size:
            raise ConfigError(f"IC grid {meta.n_ic}^3 cannot be cut into {comm.size} slabs")
        if eval_nmesh(cfg.grid, meta.box) < comm.size:
            raise ConfigError(f"evaluation grid smaller than the number of ranks {comm.size}")
    return train_specs, val_specs


def eval_nmesh(grid, box: float) -> int:
    """Cells per side of the CIC evaluation grid of a ``grid`` config section for a box in Mpc/h."""
    return grid.eval_nmesh if grid.eval_nmesh is not None else max(int(round(box / grid.eval_cell)), 2)


def _add_file_log(comm, path: Path):
    if comm.rank != 0:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(_RankFormatter(comm.rank, comm.size))
    logging.getLogger("lagbias_mpi").addHandler(handler)
    return handler


class _Sim:
    """A prepared simulation: particles on their training cell's owner, targets, tracers."""

    def __init__(self, label, role, spec, sim, parts, theta, truth_slab, n_grid, tracers):
        self.label, self.role, self.spec, self.sim = label, role, spec, sim
        self.parts, self.theta, self.truth_slab, self.n_grid = parts, theta, truth_slab, n_grid
        self.tracers = tracers

    def targets(self, comm):
        start = pipeline.local_grid_start(comm, self.n_grid)
        return lambda cells: pipeline.cell_values(self.truth_slab, self.n_grid, start, cells)


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
    train_specs, val_specs = _validate_inputs(comm, cfg, base_dir)
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


def sim_labels(n_train: int, n_val: int) -> list[str]:
    """Labels of the prepared simulations: ``train`` (``train0``, ``train1``, ... for several
    training boxes), then ``val`` (``val0``, ``val1``, ... for several)."""
    tr = ["train"] if n_train == 1 else [f"train{i}" for i in range(n_train)]
    return tr + (["val"] if n_val == 1 else [f"val{i}" for i in range(n_val)])


def prepare_simulations(comm, timer, cfg, train_specs, val_specs, exch):
    """Load, featurise and route the training then validation simulations (collective).

    ``train_specs``: a list of specs. The standardisation moments are those of the first training
    box; the orthogonaliser is fitted on the particles of all training boxes together."""
    train_specs = list(train_specs)
    radii, kinds = cfg.features.radii, cfg.features.kinds
    names = feature_names(radii, kinds)
    sims, lag, moments = [], [], None
    n_train = len(train_specs)
    for spec in [*train_specs, *val_specs]:
        with timer.stage("load"):
            log.info(f"load: {sources.spec_name(spec)} ({spec.get('path', spec['kind'])})")
            sim = sources.load(comm, spec)
        with timer.stage("features"):
            log.info(f"features: {len(names)} columns on the {sim.meta.n_ic}^3 IC grid")
            slab, mom = pipeline.ic_features(comm, sim, radii, kinds, moments)
            moments = mom if moments is None else moments
        with timer.stage("routing"):
            log.info(f"routing: {sim.meta.n_particles} particles to their Lagrangian slab")
            lag.append(pipeline.lagrangian_particles(comm, sim, slab))
        del slab
        sim.ic_delta = None  # the IC slab is not needed any more
        sims.append(sim)
    log.info(f"features: raw columns {names}")
    with timer.stage("orthogonalise"):
        raw = lag[0].raw if n_train == 1 else np.concatenate([p.raw for p in lag[:n_train]])
        orth = fit_orthogonaliser(comm, raw, names, len(radii))
        del raw
        log.info(f"orthogonalise: {orth.matrix.shape[1]} raw -> {orth.matrix.shape[0]} inputs, "
                 f"eigenvalues {np.array2string(orth.eigenvalues, precision=3)}")
    prepared = []
    with timer.stage("routing"):
        labels = sim_labels(n_train, len(val_specs))
        for i, (sim, parts, spec) in enumerate(zip(sims, lag, [*train_specs, *val_specs])):
            n_grid = int(round(sim.meta.box / cfg.grid.cell))
            parts = pipeline.eulerian_route(comm, parts, n_grid)
            tpos, tw, what = pipeline.true_tracers(comm, sim, cfg.halos)
            truth = pipeline.delta_slab(comm, tpos, tw, n_grid, sim.meta.box, "ngp")
            role, label = ("train" if i < n_train else "val"), labels[i]
            n_glob = int(global_sum(comm, np.int64(parts.n_local)))
            if n_glob != sim.meta.n_particles:
                raise SimulationFileError(f"{spec.get('path')}: {n_glob} particles loaded, meta says "
                                          f"{sim.meta.n_particles}")
            log.info(f"{label}: {n_glob} particles, training grid {n_grid}^3, true field: {what}")
            for kind, st in parts.exchange_stats:
                exch.setdefault(f"{label}_{kind}", []).append(st)
            prepared.append(_Sim(label, role, spec, sim, parts, orth.apply(parts.raw), truth, n_grid, (tpos, tw)))
    return prepared, orth, moments, names


def _exchange_summary(comm, exch) -> dict:
    out = {}
    for key, stats in exch.items():
        sent = sum(s.bytes_sent for s in stats)
        out[key] = {"bytes_sum": int(global_sum(comm, np.int64(sent))), "bytes_max": comm.allreduce(sent, op=MPI.MAX),
                    "n_particles": stats[0].n_global}
    return out


def train_ensemble(comm, cfg, trs: list, vals: list, shape: dict, ckpt_dir: Path, run_hash: str, dtype, device,
                   resume: bool = False, stop: StopControl | None = None):
    """Train the ``cfg.train.ensemble`` members on the prepared training simulations ``trs``
    (batches interleaved), validating on ``vals`` (collective). Returns (member states, histories,
    batch info, bytes of the training batches), or None when ``stop`` stopped it (a signal or a
    test budget; mid-epoch checkpoints are then written)."""
    tcfg = cfg.train
    k_cut = tcfg.kspace_loss.kcut(cfg.features.radii)
    if tcfg.kspace_loss.enabled:
        log.info(f"Fourier-space loss: weight {tcfg.kspace_loss.weight}, k <= {k_cut:.4g} h/Mpc, "
                 f"coefficients refreshed every {tcfg.kspace_loss.refresh_steps} step(s)")
    states, histories, batch_info, train_bytes = [], [], {}, 0
    for member in range(tcfg.ensemble):
        def batches(s, box=0):
            return build_batches(comm, s.theta, s.parts.cell, s.parts.pid, s.targets(comm), s.n_grid**3,
                                 s.sim.meta.n_particles, cfg.sampling.frac, cfg.sampling.batch_size,
                                 tcfg.seed, member, dtype=dtype, device=device, box=box)

        def field_set(s):
            return build_field_set(comm, s.theta, s.parts.cell, s.parts.pid, s.truth_slab, s.n_grid,
                                   s.sim.meta.box, s.sim.meta.n_particles, cfg.sampling.frac, tcfg.seed, member,
                                   k_cut, dtype=dtype, device=device)
        tset = interleave([batches(t, box) for box, t in enumerate(trs)])
        fsets = [field_set(t) for t in trs] if tcfg.kspace_loss.enabled else None
        vsets = [batches(v) for v in vals]
        train_bytes = max(train_bytes, sum(b.nbytes for b in tset.batches))
        batch_info.setdefault("n_selected", tset.n_selected)
        batch_info.setdefault("n_batches", len(tset))
        batch_info.setdefault("cells_local", tset.n_cells_local)
        log.info(f"member {member}: {tset.n_selected} selected particles in {len(tset)} batches of "
                 f"{len(trs)} training simulation(s) (validation: {[v.n_selected for v in vsets]})")
        try:
            res = train_member(comm, member, shape, tset, vsets, tcfg, ckpt_dir, run_hash, dtype, device,
                               resume=resume, stop=stop, field_sets=fsets)
        except StopRequested as exc:
            log.warning(f"{exc}; continue with --resume")
            return None
        states.append(res.state)
        histories.append(res.history)
    return states, histories, batch_info, train_bytes


def interleave(sets: list[BatchSet]) -> BatchSet:
    """One :class:`BatchSet` of the batches of several simulations, alternating between them (the
    order inside an epoch is then drawn from (seed, member, epoch) by ``sampling.batch_order``)."""
    if len(sets) == 1:
        return sets[0]
    batches = [b for group in itertools.zip_longest(*(s.batches for s in sets)) for b in group if b is not None]
    return BatchSet(batches, sum(s.n_selected for s in sets), sum(s.n_cells_local for s in sets))


def _run(comm, cfg, run_dir, train_specs, val_specs, resume, stop: StopControl):
    timer = StageTimer(comm)
    tcfg = cfg.train
    if comm.rank == 0:
        with atomic_path(run_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if cfg.run.fail_on_rank is not None and comm.rank == cfg.run.fail_on_rank:
        raise RuntimeError(f"run.fail_on_rank={cfg.run.fail_on_rank}: injected failure on rank {comm.rank}")
    torch.set_num_threads(tcfg.threads or (1 if MPI.COMM_WORLD.size > 1 else torch.get_num_threads()))
    dtype = getattr(torch, tcfg.dtype)
    device = ddp.device_for(comm)
    exch: dict = {}
    sims, orth, moments, names = prepare_simulations(comm, timer, cfg, train_specs, val_specs, exch)
    trs, vals = sims[:len(train_specs)], sims[len(train_specs):]
    tr = trs[0]
    shape = {"n_in": orth.matrix.shape[0], "width": cfg.model.width, "depth": cfg.model.depth,
             "activation": cfg.model.activation}
    run_hash = config_run_hash(cfg)
    ckpt_dir = run_dir / "checkpoints"
    with timer.stage("train"):
        with stop.handlers():  # SIGTERM/SIGUSR1: finish the step, checkpoint, stop (see stopping.py)
            trained = train_ensemble(comm, cfg, trs, vals, shape, ckpt_dir, run_hash, dtype, device, resume, stop)
        if trained is None:
            return None
        states, histories, batch_info, train_bytes = trained
        bare = bare_mlp_rate(comm, shape, int(round(batch_info["n_selected"] / batch_info["n_batches"])), tcfg,
                             dtype, device)
    ens = Ensemble(shape, states, orth, moments, names, cfg.features.radii, cfg.features.kinds, tcfg.dtype,
                   to_dict(cfg))
    if comm.rank == 0:
        ens.save(run_dir / "model.pt")
    with timer.stage("evaluate"):
        log.info("evaluate: ensemble-average and member f on all particles, CIC spectra")
        results, meta = {}, {}
        for s in sims:
            nmesh = eval_nmesh(cfg.grid, s.sim.meta.box)
            f_members = ens.predict_f_members(s.theta)
            results[s.label] = evaluate_simulation(comm, f_members, s.parts.pos, *s.tracers, s.sim.meta.box,
                                                   nmesh, cfg.grid.kmax_lowk)
            meta[s.label] = {"role": s.role, "source": str(s.spec.get("path", "")), "nmesh": nmesh}
            log.info(f"evaluate {s.label}: P_model/P_h at k < {cfg.grid.kmax_lowk} = "
                     f"{results[s.label]['pk_ratio_lowk']:.4f}, mean f {results[s.label]['mean_f']:.5f}")
        figs = run_dir / "figures"
        if comm.rank == 0:
            write_spectra(run_dir / "spectra.h5", results, meta)
        if comm.rank == 0 and cfg.run.figures:
            plots.plot_spectra(results, figs / "pk_ratio.png", cfg.grid.kmax_lowk)
            plots.plot_loss(histories, figs / "loss.png")
        n_show = min(tr.parts.n_local, 20000)
        if comm.rank == 0 and n_show and cfg.run.figures:
            f_show = ens.predict_f_members(tr.theta[:n_show]).mean(axis=0)
            ft = tr.parts.f_true[:n_show] if tr.parts.f_true is not None else None
            plots.plot_f(tr.theta[:n_show, 0], f_show, figs / "f_vs_theta0.png", ft)
    epoch_wall = [float(np.sum(h["step_wall_s"])) for h in histories]
    n_epochs_total = sum(len(h["epoch"]) for h in histories)
    train_rate = (batch_info["n_selected"] * n_epochs_total / max(sum(epoch_wall), 1e-12))
    summary = {
        "n_ranks": comm.size,
        "n_particles": sum(t.sim.meta.n_particles for t in trs),
        "n_train_sims": len(trs),
        "kspace_k_cut": tcfg.kspace_loss.kcut(cfg.features.radii) if tcfg.kspace_loss.enabled else None,
        "n_selected": batch_info["n_selected"],
        "n_batches": batch_info["n_batches"],
        "epochs": tcfg.epochs,
        "ensemble": tcfg.ensemble,
        "final_train_loss": float(np.mean([h["train_loss"][-1] for h in histories])),
        "final_val_loss": float(np.mean([h["val_loss"][-1] for h in histories])),
        "mean_f": results[tr.label]["mean_f"],
        "pk_ratio_lowk_train": results[tr.label]["pk_ratio_lowk"],
        "pk_ratio_lowk_val": results[vals[0].label]["pk_ratio_lowk"] if vals else None,
        "pk_ratio_lowk_members": {k: r["pk_ratio_lowk_members"] for k, r in results.items()},
        "stage_wall_s": timer.summary(),
        "epoch_wall_s": [h["epoch_wall_s"] for h in histories],
        "bytes_per_particle": comm.allreduce(train_bytes, op=MPI.SUM) / max(batch_info["n_selected"], 1),
        "train_particles_per_s": train_rate,
        "bare_mlp_particles_per_s": bare,
        "train_vs_bare": train_rate / bare,
        "exchange_bytes": _exchange_summary(comm, exch),
        "particles_per_rank": global_min_max_mean(comm, sum(t.parts.n_local for t in trs)),
        "cells_per_rank": global_min_max_mean(comm, batch_info["cells_local"]),
        "loss_history": histories,
        "n_inputs": shape["n_in"],
        "feature_names": names,
        "orthogonaliser_eigenvalues": orth.eigenvalues,
        "backend": ddp.default_backend() if comm.size > 1 else "none (1 rank)",
    }
    write_summary(comm, run_dir / "summary.json", summary, cfg=cfg)
    log.info(f"done: final train loss {summary['final_train_loss']:.6g}, val loss {summary['final_val_loss']:.6g}, "
             f"mean f {summary['mean_f']:.5f}, P ratio low-k train {summary['pk_ratio_lowk_train']:.4f} "
             f"val {summary['pk_ratio_lowk_val']}, {train_rate:.3g} particles/s "
             f"({100 * train_rate / bare:.0f}% of bare MLP); run directory {run_dir}")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD

    stop = StopControl(args.stop_after_epochs, args.stop_after_steps)
    rc = run_command(comm, lambda: run(comm, args.config, args.set, args.out, args.resume, stop=stop))
    if rc == 0 and stop.signalled is not None:
        return 128 + int(stop.signalled)  # stopped by a signal (checkpointed): the shell's convention
    return rc


if __name__ == "__main__":
    sys.exit(main())
