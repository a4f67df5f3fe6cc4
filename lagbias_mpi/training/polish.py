"""The full-batch phase after the Adam epochs (``train.polish``): L-BFGS on the grid term of the whole
training set, with f scaled to the set's true sum (the constraint by construction, as in training).

Why (issue #15, docs/results.md "(d)"): on spiky planted truths the few cells of the true field's
tail (the top 0.01% of f_true held 25% of the halo mass) are seen by a few batches per epoch, whose
gradients the clip (2x the running median) cuts and Adam's noise averages away: the trained network
missed the tail's mass by 5% and the low-k power by 5% **on its training box**, although a full-batch
fit of the same deviance recovered it (P ratio 1.0015), and the same network polished by full-batch
L-BFGS went from 0.9506 to 0.9969 in 20 evaluations. A full-batch quasi-Newton step sees every cell in
every evaluation: the tail is never clipped and never sampled away.

Objective (one number for the set, all ranks): with S = sum_i w_i f_i over all batches and T the true
field's sum, c = T / S and m_j = c scale_j sum_{i in j} f_i,

    L = sum_j g(m_j, t_j) + guard,

g the grid term of ``train.grid_loss``. L does not depend on the normalisation of f (the output bias
gets no gradient and stays where the epochs' renormalisation left it). Its gradient through c is the
surrogate K S_local, K = -(c / S) sum_j g'(m_j) scale_j sum_{i in j} f_i (as
:func:`lagbias_mpi.training.loss.projected_grid`, over the set instead of a batch). One evaluation:
a forward pass over the batches without gradient (c, K, L), a forward and backward pass batch by
batch (activations of one batch alive), one Reduce + Bcast of the gradient and L (bit-identical on
every rank, so that every rank's L-BFGS takes the same branches and steps).

With ``train.kspace_loss`` the objective adds the Fourier-space loss of the same scaled field,
weight L_k(c f) (:func:`lagbias_mpi.training.kspace.kspace_terms`: one more forward pass without
gradient per evaluation, and per particle its coefficient a_i = weight c scale_j dL_k/dr_j in the
backward pass, plus dL_k/dc in K): the phase fits the low-k residual the epochs' loss aimed at,
instead of undoing it.

Every ``check_every`` evaluations the same objective is evaluated on the validation sets; the phase
keeps the model with the lowest validation value, the epochs' model included (early stopping: a
phase that only fits the training box's noise changes nothing). Inside a check torch's line search
has the check's evaluations only: where f overflows the closure returns a large finite value (an
inf makes torch's interpolation nan), a lower point the last search evaluated but dropped is kept
(:func:`_take_best_on_line`), and a check that still stalls gets one iteration with a full line
search before it ends the phase. Written by hand: torch's L-BFGS
drives it; what no library does is the distributed, batch-streamed, projected closure.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.training.batches import BatchSet
from lagbias_mpi.training.kspace import FieldSet, kspace_terms
from lagbias_mpi.training.loss import output_bias, scaled_terms, set_statistics, through_scale
from lagbias_mpi.training.stopping import StopRequested

log = get_logger("polish")


@dataclass(frozen=True)
class KSpaceTerm:
    """The Fourier-space loss in the phase's objective: the training simulations' field sets (in the
    order of the batches' ``box``), ``train.kspace_loss``'s weight and forward chunk."""

    field_sets: list[FieldSet]
    weight: float
    chunk: int


def set_loss(comm, model, batches: BatchSet, guard_y: float, grid_loss: str,
             kspace: KSpaceTerm | None = None) -> float:
    """The phase's objective L of the whole set (no gradient; collective)."""
    st = set_statistics(comm, model, batches, guard_y, grid_loss)
    extra = 0.0 if kspace is None else sum(
        kspace_terms(comm, model, fs, kspace.weight, kspace.chunk, st.c).loss for fs in kspace.field_sets)
    return st.grid + st.guard + extra


def set_loss_and_gradient(comm, model, batches: BatchSet, guard_y: float, grid_loss: str,
                          kspace: KSpaceTerm | None = None) -> float:
    """L of the whole set, with its gradient in the parameters' ``.grad`` (summed over ranks and
    bit-identical on every rank; the output bias's is 0). Collective."""
    st = set_statistics(comm, model, batches, guard_y, grid_loss)
    c, k, total_loss = st.c, st.k, st.grid + st.guard
    coefs = None
    if kspace is not None:
        terms = [kspace_terms(comm, model, fs, kspace.weight, kspace.chunk, c) for fs in kspace.field_sets]
        total_loss += sum(t.loss for t in terms)
        k += through_scale(sum(t.dloss_dc for t in terms), c, st.s)  # L_k's part through c = T / S
        coefs = [t.coef for t in terms]
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    for batch in batches.batches:
        g, gd, s_local, _, f = scaled_terms(model, batch, guard_y, c, grid_loss)
        obj = g + gd + k * s_local
        if coefs is not None:
            a = torch.as_tensor(coefs[batch.box][batch.pidx], dtype=f.dtype, device=f.device)
            obj = obj + (a * f.reshape(-1)).sum()
        obj.backward()
    output_bias(model).grad.zero_()
    loss = [total_loss if comm.rank == 0 else 0.0]  # global already: rank 0's value for everybody
    flat = np.concatenate([p.grad.detach().cpu().numpy().ravel().astype(np.float64) for p in params] + [loss])
    total = np.empty_like(flat) if comm.rank == 0 else None
    comm.Reduce(flat, total, op=MPI.SUM, root=0)
    if comm.rank != 0:
        total = np.empty_like(flat)
    comm.Bcast(total, root=0)  # one order of summation for everybody: identical bits on every rank
    lo = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(torch.as_tensor(total[lo:lo + n].reshape(p.shape), dtype=p.dtype))
        lo += n
    return float(total[-1])


def validation_value(comm, model, val_sets: list[BatchSet], guard_y: float, grid_loss: str) -> float:
    """Sum of :func:`set_loss` over the validation sets (nan when there are none)."""
    if not val_sets:
        return float("nan")
    return float(sum(set_loss(comm, model, vs, guard_y, grid_loss) for vs in val_sets))


def _state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


LINE_SEARCH_EVALS = 25  # torch's own bound on a strong-Wolfe line search
OVERFLOW_FACTOR = 1e3  # the objective reported where f overflows, in units of the check's start


@dataclass
class _CheckTrace:
    """What the closure saw in one check: the objective the check started from (the scale of the
    value reported where f overflows) and the lowest objective evaluated, with its parameters."""

    start: float = 1.0
    best: float = float("inf")
    best_flat: torch.Tensor | None = None

    def seen(self, loss: float, model) -> None:
        if loss < self.best:
            self.best, self.best_flat = loss, _flat(model)


def _lbfgs_check(opt, closure, trace: _CheckTrace, model, objective) -> float:
    """One ``opt.step`` (a check's iterations), then the lowest point its last line search evaluated
    if the search did not return it (:func:`_take_best_on_line`); returns the objective there."""
    trace.best, trace.best_flat = float("inf"), None
    opt.step(closure)
    value = objective()
    st = opt.state[opt.param_groups[0]["params"][0]]
    if trace.best < value and _take_best_on_line(model, st, trace.best_flat):
        value = objective()
    return value


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _take_best_on_line(model, lbfgs_state: dict, best: torch.Tensor) -> bool:
    """Move to ``best``, a point the last line search evaluated and lowered the objective at but
    did not return: torch's strong-Wolfe search, when its evaluation budget (``max_eval`` of the
    check) runs out while it is still extending the step, returns the step 0 and drops the lower
    point it found (measured: a first step 1 / |g|_1 far too short on a steep objective, 475558 ->
    339127 found, 475558 kept, and the phase ended as stalled). The point lies on the search's line
    x_init + t d: L-BFGS's state gets its t, so that the next iteration's curvature pair (s = t d,
    y = g(best) - g(x_init)) is the true one. Returns False (nothing changed) when ``best`` is not on
    the line of the state's direction."""
    d, t = lbfgs_state.get("d"), lbfgs_state.get("t")
    if d is None or t is None:
        return False
    delta = best - _flat(model)
    dd = float(d.dot(d))
    if not dd > 0:
        return False
    t_add = float(delta.dot(d)) / dd
    if float((delta - t_add * d).norm()) > 1e-6 * max(float(delta.norm()), 1e-300):
        return False
    with torch.no_grad():
        lo = 0
        for p in model.parameters():
            n = p.numel()
            p.copy_(best[lo:lo + n].reshape(p.shape))
            lo += n
    lbfgs_state["t"] = float(t) + t_add
    return True


def polish_member(comm, member: int, model, train_set: BatchSet, val_sets: list[BatchSet], tcfg, save,
                  resume_state: dict | None = None, stop=None, field_sets: list[FieldSet] | None = None) -> dict:
    """Run the phase on ``model`` (in place; collective). ``save(polish_state)`` checkpoints after
    every check (the caller stores the model beside it); ``resume_state`` continues from such a state,
    ``model`` holding the model saved with it. ``field_sets`` (with ``train.kspace_loss``): the
    Fourier-space loss joins the training objective (not the validation value). Returns the phase's record (also the
    ``polish`` entry of the member's history): per check the iterations and evaluations so far, the
    training and validation objectives and the wall time, which check's model was kept, and
    ``stopped`` (why) when a check did not lower the set's objective (a stalled or failed line
    search, f overflowing): its steps are undone and the phase ends, so that it never leaves a worse
    model nor spends evaluations where it makes no progress."""
    pcfg = tcfg.polish
    kspace = (KSpaceTerm(list(field_sets), tcfg.kspace_loss.weight, tcfg.kspace_loss.chunk)
              if field_sets else None)
    with torch.no_grad():  # the ranks start from identical bits (DDP keeps them equal up to rounding)
        for p in model.parameters():
            flat = p.detach().cpu().numpy().copy()
            comm.Bcast(flat, root=0)
            p.copy_(torch.as_tensor(flat, dtype=p.dtype))
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=pcfg.check_every, max_eval=pcfg.check_every,
                            history_size=pcfg.history,
                            line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)

    trace = _CheckTrace()

    def closure():
        loss = set_loss_and_gradient(comm, model, train_set, tcfg.guard_y, tcfg.grid_loss, kspace)
        if np.isfinite(loss):
            trace.seen(loss, model)
            return loss
        # f overflowed at this trial point: a finite value far above the check's start, with no
        # gradient, from which the strong-Wolfe search backs off (about 10x in the step per
        # evaluation; an inf there turns its cubic interpolation, and then every later trial
        # point, into nan: measured, a stalled phase). The same on every rank: the loss is rank 0's.
        for p in model.parameters():
            p.grad.zero_()
        return OVERFLOW_FACTOR * max(abs(trace.start), 1.0)

    def objective():
        return set_loss(comm, model, train_set, tcfg.guard_y, tcfg.grid_loss, kspace)

    if resume_state is None:
        t0 = time.perf_counter()
        train0 = set_loss(comm, model, train_set, tcfg.guard_y, tcfg.grid_loss, kspace)
        val0 = validation_value(comm, model, val_sets, tcfg.guard_y, tcfg.grid_loss)
        record = {"check": [0], "iterations": [0], "evaluations": [0], "train_loss": [train0], "val_loss": [val0],
                  "wall_s": [comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)], "kept": 0}
        best = {"val": val0, "state": _state(model)}
        log.info(f"member {member} polish: start, set loss {train0:.6g} (validation {val0:.6g})")
    else:
        record, best = resume_state["record"], resume_state["best"]
        opt.load_state_dict(resume_state["lbfgs"])
        log.info(f"member {member} polish: resumed after {record['evaluations'][-1]} evaluations")
    n_checks = -(-pcfg.evaluations // pcfg.check_every)
    while len(record["check"]) <= n_checks and "stopped" not in record:
        if stop is not None and comm.allreduce(stop.start_epoch() or stop.signalled is not None, op=MPI.LOR):
            raise StopRequested(f"stopped by {stop.reason()} in member {member}'s polish after "
                                f"{record['evaluations'][-1]} evaluations")
        t0, before, previous = time.perf_counter(), _state(model), record["train_loss"][-1]
        trace.start = previous
        train_loss = _lbfgs_check(opt, closure, trace, model, objective)
        if np.isfinite(train_loss) and not train_loss < previous:
            # stalled: the line search ran out of the check's evaluations before it found a lower
            # point; one more iteration whose line search may take LINE_SEARCH_EVALS
            group = opt.param_groups[0]
            budget = group["max_iter"], group["max_eval"]
            group["max_iter"], group["max_eval"] = 1, LINE_SEARCH_EVALS
            train_loss = _lbfgs_check(opt, closure, trace, model, objective)
            group["max_iter"], group["max_eval"] = budget
        st = opt.state[opt.param_groups[0]["params"][0]]  # L-BFGS keeps its state on its first parameter
        if not train_loss < previous:  # no decrease (stalled), worse or non-finite: undo, end the phase
            model.load_state_dict(before)
            record["stopped"] = (f"check {len(record['check'])}: the set loss went from {previous:.6g} to "
                                 f"{train_loss:.6g} (no decrease: a stalled or failed line search); the step "
                                 f"was undone")
            log.warning(f"member {member} polish: {record['stopped']}; the phase ends here")
            save({"record": record, "best": best, "lbfgs": opt.state_dict()})
            break
        val = validation_value(comm, model, val_sets, tcfg.guard_y, tcfg.grid_loss)
        for key, value in (("check", len(record["check"])), ("iterations", int(st.get("n_iter", 0))),
                           ("evaluations", int(st.get("func_evals", 0))), ("train_loss", train_loss),
                           ("val_loss", val),
                           ("wall_s", comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))):
            record[key].append(value)
        better = val < best["val"] if np.isfinite(best["val"]) else True
        if better or not val_sets:
            best = {"val": val, "state": _state(model)}
            record["kept"] = record["check"][-1]
        log.info(f"member {member} polish: {record['iterations'][-1]} iterations ({record['evaluations'][-1]} "
                 f"evaluations): set loss {train_loss:.6g}, validation {val:.6g}"
                 f"{' (best so far)' if record['kept'] == record['check'][-1] else ''} "
                 f"({record['wall_s'][-1]:.1f} s)")
        save({"record": record, "best": best, "lbfgs": opt.state_dict()})
    model.load_state_dict(best["state"])
    if record["kept"] != record["check"][-1]:
        log.info(f"member {member} polish: kept the model of check {record['kept']} (lowest validation loss)")
    return record
