"""Distributed training of one ensemble member: DDP steps with warm-up and decay, validation, divergence
guard, checkpoints and resume, the epoch loop (the loss of a batch: :mod:`lagbias_mpi.training.loss`),
then the full-batch phase when configured (:mod:`lagbias_mpi.training.polish`).
"""
from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from lagbias_mpi.bias.model import build_model
from lagbias_mpi.core.faults import fail_point
from lagbias_mpi.core.logs import Progress, get_logger
from lagbias_mpi.training import ddp
from lagbias_mpi.training.batches import Batch, BatchSet
from lagbias_mpi.training.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from lagbias_mpi.training.clipping import GradClip
from lagbias_mpi.training.kspace import FieldSet, kspace_coefficients
from lagbias_mpi.training.loss import (
    RunningSum,
    evaluate_loss,
    local_objective,
    normalise_step,
    output_bias,
    renormalise,
)
from lagbias_mpi.training.polish import polish_member
from lagbias_mpi.training.sampling import batch_order
from lagbias_mpi.training.stopping import StopControl, StopRequested

log = get_logger("trainer")


# A batch whose weighted sum of f exceeds the true field's sum over its cells by this factor has
# diverged. Transients far above 1 are part of training a spiky truth and recover: measured on planted
# truths (docs/results.md), a batch's sum reached ~1e3 x its truth's (shipped settings, spiky corner
# b = (2, 0.2, -1)) and ~4e5 x (the paper's lr 0.02 without warm-up) in the first steps, and both
# members then trained to the end. 1e9 leaves f = 10^y some 29 decades below float32's overflow.
MAX_SUM_OVER_TRUTH = 1e9


def sum_over_truth(s_glob: float, batch: Batch) -> float:
    """A batch's weighted sum of f, S = sum_i w_i f_i, over the true field's sum T of its cells (over
    its particle count N when T = 0): 1 for a perfect model."""
    return s_glob / batch.true_sum if batch.true_sum > 0 else s_glob / max(batch.n_all, 1)


def diverged(loss: float, s_glob: float, batch: Batch) -> bool:
    """Whether a step's whole-batch loss is non-finite or its :func:`sum_over_truth` is non-finite
    or above :data:`MAX_SUM_OVER_TRUTH`."""
    ratio = sum_over_truth(s_glob, batch)
    return not (np.isfinite(loss) and np.isfinite(ratio) and ratio < MAX_SUM_OVER_TRUTH)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate factor of optimiser step ``step`` (from 0): linear from 1/W to 1 over the first
    W = ``warmup_steps`` steps, then 1 (pure)."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


@dataclass
class MemberResult:
    state: dict
    history: dict


def _empty_history() -> dict:
    return {"epoch": [], "train_loss": [], "val_loss": [], "mean_f": [], "val_mean_f": [], "eps": [],
            "lr": [], "epoch_wall_s": [], "step_wall_s": []}


def train_member(comm, member: int, shape: dict, train_set: BatchSet, val_sets: list[BatchSet], tcfg,
                 ckpt_dir, config_hash: str, dtype=torch.float32, device="cpu", resume: bool = False,
                 stop: StopControl | None = None, field_sets: list[FieldSet] | None = None) -> MemberResult:
    """Train member ``member`` for ``tcfg.epochs`` epochs (collective); checkpoint every epoch, every
    ``tcfg.checkpoint_steps`` optimiser steps (0: only at epoch ends) and mid-epoch when ``stop`` asks
    to stop (then :class:`StopRequested` is raised); ``resume`` continues with the next step, also
    after a hard kill (from the latest checkpoint).

    ``field_sets`` (one per training simulation): with ``tcfg.kspace_loss.enabled``, the Fourier-space
    loss of the whole training grids, its coefficients computed from the current model every
    ``kspace_loss.refresh_steps`` steps and applied in every batch step (:mod:`lagbias_mpi.training.kspace`;
    not with ``kspace_loss.in_epochs`` false), and in the full-batch phase's objective.
    """
    model = build_model(shape, seed=tcfg.seed * 1000 + member, dtype=dtype).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=tcfg.epoch_decay)
    history, start, partial, ckpt_running, ckpt_norms = _empty_history(), 1, None, None, None
    path = checkpoint_path(ckpt_dir, member)
    ckpt = load_checkpoint(comm, path) if resume else None
    if ckpt is not None:
        if ckpt["config_hash"] != config_hash:
            raise ValueError(f"{path} was written with a different configuration (hash "
                             f"{ckpt['config_hash']} != {config_hash}); cannot resume")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        history, start, partial = ckpt["history"], ckpt["epoch"] + 1, ckpt.get("in_epoch")
        ckpt_running, ckpt_norms = ckpt.get("running_sum"), ckpt.get("grad_norms")
        torch.random.set_rng_state(ckpt["torch_rng"])
        where = f"epoch {start} step {partial['step']}" if partial else f"epoch {start}"
        log.info(f"member {member}: resumed from {path}, continuing with {where}")
    dmodel = ddp.wrap(model, comm)
    stop = stop or StopControl()
    try:
        final = _epochs(comm, member, dmodel, model, opt, sched, history, start, path, train_set, val_sets, tcfg,
                        config_hash, shape, stop, field_sets if tcfg.kspace_loss.in_epochs else None, partial,
                        ckpt_running, ckpt_norms)
        if tcfg.polish.evaluations > 0:
            _polish(comm, member, model, train_set, val_sets, tcfg, path, final, history, stop,
                    ckpt.get("polish") if ckpt is not None else None, field_sets)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the frames would keep the DDP wrapper alive
        raise
    finally:
        del dmodel  # free DDP's reducer while the process group lives (a late free can deadlock)
        gc.collect()
    return MemberResult({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, history)


def _polish(comm, member, model, train_set, val_sets, tcfg, path, final: dict, history: dict, stop, resume_state,
            field_sets=None):
    """The full-batch phase after the epochs (:mod:`lagbias_mpi.training.polish`), checkpointed after
    every check in the last epoch's checkpoint (``final``) with a ``polish`` entry; a finished phase
    (``resume_state["finished"]``) is not run again."""
    if resume_state is not None and resume_state.get("finished"):
        history["polish"] = resume_state["record"]
        return
    if not sum(b.true_sum for b in train_set.batches) > 0:
        log.info(f"member {member}: no true mass in the training set, no polish")
        return

    def save(state, finished=False):
        state = {**state, "finished": finished}
        save_checkpoint(comm, path, {**final, "model": model.state_dict(), "history": history,
                                     "done": finished, "polish": state})
    history["polish"] = polish_member(comm, member, model, train_set, val_sets, tcfg, save, resume_state, stop,
                                       field_sets)
    save({"record": history["polish"]}, finished=True)


def _step(comm, dmodel, opt, batch: Batch, eps, guard_y: float, kspace_coef: np.ndarray | None, lr_step: float,
          stop_wish: bool, others=None, constraint: str = "penalty", grid_loss: str = "mse",
          clip: GradClip | None = None) -> tuple[float, float, bool, float]:
    """One optimiser step on ``batch`` at learning rate ``lr_step`` (the group's lr is restored
    afterwards, so that the scheduler and checkpoints see the epoch's lr), the gradient clipped by
    ``clip``. Returns (whole-batch loss, global sum of f, whether any rank wants to stop, the factor
    the gradient was clipped by). A diverged step (:func:`diverged`) is not stepped on."""
    opt.zero_grad(set_to_none=False)
    coef = None if kspace_coef is None else torch.as_tensor(kspace_coef, dtype=batch.dtype, device=batch.scale.device)
    obj, loss, s_glob, stopping = local_objective(comm, dmodel, batch, eps, guard_y, coef, stop_wish, others,
                                                  constraint, grid_loss)
    fail_point(comm, "ddp_step")  # tests: one rank fails while the others enter DDP's all-reduce
    if diverged(loss, s_glob, batch):
        return loss, s_glob, stopping, 1.0
    obj.backward()
    if constraint == "projection":  # the projected loss is blind to the output bias: its gradient is
        output_bias(dmodel).grad.zero_()  # rounding noise, which Adam would turn into lr-sized steps
    clipped = clip(dmodel.parameters()) if clip is not None else 1.0
    lr = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = lr_step
    opt.step()
    for group, value in zip(opt.param_groups, lr):
        group["lr"] = value
    return loss, s_glob, stopping, clipped


def _epochs(comm, member, dmodel, model, opt, sched, history, start, path, train_set, val_sets, tcfg,
            config_hash, shape, stop: StopControl, field_sets=None, partial=None, ckpt_running=None,
            ckpt_norms=None):
    """The epoch loop of :func:`train_member`; ``partial``: the ``in_epoch`` state of a mid-epoch
    checkpoint (the first epoch continues after its ``step`` steps)."""
    def payload(epoch, in_epoch=None):
        done = epoch == tcfg.epochs and in_epoch is None and tcfg.polish.evaluations == 0
        return {"member": member, "epoch": epoch, "done": done,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": history, "torch_rng": torch.random.get_rng_state(), "config_hash": config_hash,
                "shape": shape, "in_epoch": in_epoch, "running_sum": running.s_last.copy(),
                "grad_norms": list(clip.norms)}

    project = tcfg.constraint == "projection"
    running = RunningSum.start(train_set)
    if ckpt_running is not None:
        running.s_last = np.asarray(ckpt_running, np.float64).copy()
    clip = GradClip(tcfg.clip_grad, tcfg.clip_window, list(ckpt_norms or []))

    for epoch in range(start, tcfg.epochs + 1):
        if stop.start_epoch():
            raise StopRequested(f"stopped by {stop.reason()} before member {member} epoch {epoch}; "
                                f"checkpoint {path}")
        eps = tcfg.eps(epoch)
        # the constraint's mode this epoch (training.loss.local_objective), and whether the output
        # bias is reset from the running sum after every step
        by_step = (eps is not None or project) and tcfg.normalise_steps
        mode = "projection" if project else ("held" if by_step else "penalty")
        lr = opt.param_groups[0]["lr"]
        skip, losses, s_tot, t_before, n_clipped = 0, [], 0.0, 0.0, 0
        if partial is not None:
            skip, losses, s_tot, t_before = partial["step"], list(partial["losses"]), partial["s_tot"], partial["wall_s"]
            n_clipped = partial.get("clipped", 0)
            partial = None
        t0 = time.perf_counter() - t_before
        coefs, kcfg = None, tcfg.kspace_loss
        prog = Progress(comm, len(train_set), f"member {member} epoch {epoch}")
        for i, b in enumerate(batch_order(len(train_set), tcfg.seed, member, epoch)):
            if i < skip:
                continue
            batch = train_set.batches[b]
            if field_sets and (coefs is None or i % kcfg.refresh_steps == 0):
                coefs = None  # the previous coefficients (8 B per particle) freed before the new ones
                kl, coefs = zip(*[kspace_coefficients(comm, model, fs, kcfg.weight, kcfg.chunk) for fs in field_sets])
                if not np.isfinite(sum(kl)):
                    raise TrainingDiverged(f"Fourier-space loss {sum(kl):.4g} at member {member}, epoch {epoch}")
                if i == 0:
                    history.setdefault("kspace_loss", []).append(float(sum(kl)))
            coef = None if coefs is None else coefs[batch.box][batch.pidx]
            lr_step = lr * warmup_factor((epoch - 1) * len(train_set) + i, tcfg.warmup_steps)
            loss, s_glob, stopping, clipped = _step(comm, dmodel, opt, batch, eps, tcfg.guard_y, coef, lr_step,
                                                    stop.after_this_step(), running.others(b), mode, tcfg.grid_loss,
                                                    clip)
            n_clipped += clipped < 1.0
            if diverged(loss, s_glob, batch):
                good = f"{path} (epoch {epoch - 1})" if epoch > 1 else "none (first epoch)"
                raise TrainingDiverged(f"loss {loss:.4g}, batch sum of f {sum_over_truth(s_glob, batch):.4g} x the true "
                                       f"field's at member {member}, "
                                       f"epoch {epoch}, step {i}: training diverged and stopped; "
                                       f"last good checkpoint: {good}")
            losses.append(loss)
            s_tot += s_glob
            if by_step:  # the constraint by construction: the running sum set to T after every step
                normalise_step(model, running, b, s_glob)
            else:
                running.s_last[b] = s_glob
            prog.update(i + 1)
            every = getattr(tcfg, "checkpoint_steps", 0)
            periodic = every > 0 and ((epoch - 1) * len(train_set) + i + 1) % every == 0
            if (stopping or periodic) and i + 1 < len(train_set):  # mid-epoch checkpoint (same on all ranks)
                save_checkpoint(comm, path, payload(epoch - 1, {
                    "epoch": epoch, "step": i + 1, "losses": list(losses), "s_tot": s_tot, "clipped": n_clipped,
                    "wall_s": comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)}))
            if stopping and i + 1 < len(train_set):
                raise StopRequested(f"stopped by {stop.reason()} in member {member} epoch {epoch} after step "
                                    f"{i + 1}/{len(train_set)}; checkpoint {path}")
            if stopping:  # the epoch's last step: finish the epoch (validation, checkpoint), then stop
                stop.before_next_epoch()
        sched.step()
        if eps is not None or project:  # mean f = T / N after every epoch
            history.setdefault("renorm", []).append(renormalise(comm, model, train_set, tcfg.guard_y, running))
        t_train = time.perf_counter() - t0
        val = [evaluate_loss(comm, model, vs, eps, tcfg.guard_y, tcfg.grid_loss, projection=tcfg.constraint == "projection")
               for vs in val_sets]
        history["epoch"].append(epoch)
        history["train_loss"].append(float(np.mean(losses)))
        history["val_loss"].append(float(np.mean([v[0] for v in val])) if val else float("nan"))
        history["mean_f"].append(s_tot / max(train_set.n_particles, 1))
        history["val_mean_f"].append(float(np.mean([v[1] for v in val])) if val else float("nan"))
        history["eps"].append(eps if eps is not None else float("nan"))
        history["lr"].append(lr)
        history["epoch_wall_s"].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        history["step_wall_s"].append(comm.allreduce(t_train, op=MPI.MAX))
        history.setdefault("clipped_steps", []).append(int(n_clipped))
        save_checkpoint(comm, path, payload(epoch))
        renorm = f" (renormalised x {history['renorm'][-1]:.4g})" if eps is not None or project else ""
        val_part = f"val loss {history['val_loss'][-1]:.6g} " if val else ""
        log.info(f"member {member} epoch {epoch}/{tcfg.epochs}: train loss {history['train_loss'][-1]:.6g} "
                 f"{val_part}mean f in the epoch {history['mean_f'][-1]:.5f}{renorm} "
                 f"eps {eps if eps is not None else 'off'} lr {lr:.4g} "
                 f"({history['epoch_wall_s'][-1]:.2f} s)")
    return payload(tcfg.epochs)


def bare_mlp_rate(comm, shape: dict, n_particles_global: int, tcfg, dtype=torch.float32, device="cpu") -> float:
    """Particles per second of a plain forward + backward + Adam step of the same network, each rank
    on its share of ``n_particles_global`` particles (no DDP, no loss structure)."""
    n_local = max(n_particles_global // comm.size, 1)
    model = build_model(shape, seed=tcfg.seed + 99991, dtype=dtype).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(n_local, shape["n_in"], generator=torch.Generator().manual_seed(7), dtype=dtype).to(device)
    times = []
    for _ in range(tcfg.bare_steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        y = model(x)
        (y * y).mean().backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times[1:])) if len(times) > 1 else times[0]
    t = comm.allreduce(t, op=MPI.MAX)
    return n_local * comm.size / t
