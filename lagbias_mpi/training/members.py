"""Training the members of an ensemble on prepared simulations.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lagbias_mpi.bias.model import build_model, f_of_y
from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.training.batches import build_batches, interleave
from lagbias_mpi.training.kspace import build_field_set
from lagbias_mpi.training.loop import TrainingDiverged, train_member
from lagbias_mpi.training.loss import evaluate_loss, output_bias
from lagbias_mpi.training.sampling import resolve_frac
from lagbias_mpi.training.stopping import StopControl, StopRequested

log = get_logger("train")


def sim_frac(cfg, s) -> float:
    """The selected fraction per cell of prepared simulation ``s`` (``sampling.frac``, "auto" resolved
    from its mean cell occupancy)."""
    return resolve_frac(cfg.sampling.frac, cfg.sampling.per_cell, s.sim.meta.n_particles, s.n_grid**3)


def member_batches(comm, cfg, s, member: int, dtype, device, box: int = 0):
    """The batches of member ``member`` on the prepared simulation ``s`` (collective)."""
    return build_batches(comm, s.theta, s.parts.cell, s.parts.pid, s.targets(comm), s.n_grid**3,
                         s.sim.meta.n_particles, sim_frac(cfg, s), cfg.sampling.batch_size,
                         cfg.train.seed, member, dtype=dtype, device=device, box=box)


def validation_losses(comm, cfg, s, models: list, dtype, device) -> list[tuple[float, float]]:
    """(loss, mean f) of every trained member on its batches of the prepared simulation ``s``, with
    the last epoch's integral-constraint epsilon (collective)."""
    eps = cfg.train.eps(cfg.train.epochs)
    return [evaluate_loss(comm, model, member_batches(comm, cfg, s, m, dtype, device), eps, cfg.train.guard_y,
                          cfg.train.grid_loss, projection=cfg.train.constraint == "projection")
            for m, model in enumerate(models)]


FORWARD_CHUNK = 1 << 16  # particles per forward pass of the normalisation (bounded activations)


def normalise_over_all_particles(comm, shape: dict, state: dict, trs: list, dtype, device) -> tuple[dict, float]:
    """The integral constraint made exact over every particle of the training boxes: the output bias
    of ``state`` shifted so that sum_i f_i = N_particles (the model field has mean 1, as the true
    field has), from one forward pass over all particles and one Allreduce (collective). The
    per-epoch renormalisation of training holds the mean of the selected particles' weighted f,
    a sampling estimate (~std(f) / sqrt(n_selected): 3e-3 on the built-in box). Returns (the new
    state, the factor f was multiplied by)."""
    model = build_model(shape, seed=0, dtype=dtype).to(device)
    model.load_state_dict(state)
    model.eval()
    local = 0.0
    with torch.no_grad():
        for s in trs:
            for lo in range(0, len(s.theta), FORWARD_CHUNK):
                x = torch.as_tensor(s.theta[lo:lo + FORWARD_CHUNK], dtype=dtype, device=device)
                local += float(f_of_y(model(x).double()).sum())
    total = float(global_sum(comm, np.float64(local)))
    n = sum(int(s.sim.meta.n_particles) for s in trs)
    if not (np.isfinite(total) and total > 0):
        return state, 1.0
    factor = n / total
    with torch.no_grad():
        output_bias(model).add_(float(np.log10(factor)))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, factor


def train_ensemble(comm, cfg, trs: list, vals: list, shape: dict, ckpt_dir: Path, run_hash: str, dtype, device,
                   resume: bool = False, stop: StopControl | None = None):
    """Train the ``cfg.train.ensemble`` members on the prepared training simulations ``trs``
    (batches interleaved), validating on ``vals`` (collective). Returns (member states, histories,
    batch info, bytes of the training batches, failures), or None when ``stop`` stopped it (a signal
    or a test budget; mid-epoch checkpoints are then written). A member whose training diverged
    (:class:`TrainingDiverged`) is logged and left out: ``failures`` maps its index to the reason
    (states and histories hold the other members); when every member diverged the error is raised."""
    tcfg = cfg.train
    k_cut = tcfg.kspace_loss.kcut(cfg.features.radii)
    if tcfg.kspace_loss.enabled:
        where = (f"coefficients refreshed every {tcfg.kspace_loss.refresh_steps} step(s)"
                 if tcfg.kspace_loss.in_epochs else "in the full-batch phase only")
        log.info(f"Fourier-space loss: weight {tcfg.kspace_loss.weight}, k <= {k_cut:.4g} h/Mpc, {where}")
    states, histories, batch_info, train_bytes, failures = [], [], {}, 0, {}
    for member in range(tcfg.ensemble):
        def batches(s, box=0):
            return member_batches(comm, cfg, s, member, dtype, device, box)

        def field_set(s):
            return build_field_set(comm, s.theta, s.parts.cell, s.parts.pid, s.truth, s.n_grid,
                                   s.sim.meta.box, s.sim.meta.n_particles, sim_frac(cfg, s), tcfg.seed, member,
                                   k_cut, dtype=dtype, device=device, ownership=s.ownership)
        tset = interleave([batches(t, box) for box, t in enumerate(trs)])
        fsets = [field_set(t) for t in trs] if tcfg.kspace_loss.enabled else None
        vsets = [batches(v) for v in vals]
        train_bytes = max(train_bytes, sum(b.nbytes for b in tset.batches))
        batch_info.setdefault("frac", sim_frac(cfg, trs[0]))
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
        except TrainingDiverged as exc:
            log.error(f"member {member} left out of the ensemble: {exc}")
            failures[member] = f"diverged in training: {exc}"
            del tset, fsets, vsets
            continue
        del tset, fsets, vsets  # freed before the next member's batches are built
        state = res.state
        if tcfg.eps(tcfg.epochs) is not None:  # the constraint is on: make it exact over all particles
            state, factor = normalise_over_all_particles(comm, shape, state, trs, dtype, device)
            res.history["final_normalisation"] = factor
            log.info(f"member {member}: f x {factor:.6f} for mean f = 1 over all training particles")
        states.append(state)
        histories.append(res.history)
    if failures and not states:
        raise TrainingDiverged(f"every member diverged: {failures}")
    return states, histories, batch_info, train_bytes, failures
