"""Evaluation of a trained ensemble on a simulation (paper section 3, eq. 3.1).

The ensemble-average f (and each member's f) is CIC-painted at the particles' final positions on the
evaluation grid and compared with the true field painted the same way: P_model/P_h, the cross
spectrum P_hm and P_uncorr = P_model - P_hm^2 / P_h (CIC-compensated, no shot-noise subtraction).
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.mesh.paint import paint, route_to_slabs
from lagbias_mpi.mesh.power import (
    mean_ratio_below,
    mode_weighted_ratio_below,
    overdensity,
    power_spectrum,
)
from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.mpi.fft import SlabFFT

log = get_logger("evaluate")


def _lowk(k, ratio, kmax: float) -> float:
    """Mean ratio below kmax, NaN (with a warning) when the box has no such bin."""
    try:
        return mean_ratio_below(k, ratio, kmax)
    except ValueError as exc:
        log.warning(f"pk_ratio_lowk is NaN: {exc}")
        return float("nan")


def _lowk_modes(k, modes, p_model, p_h, kmax: float) -> float:
    """sum N_k P_model / sum N_k P_h below kmax, NaN when the box has no such bin."""
    try:
        return mode_weighted_ratio_below(k, modes, p_model, p_h, kmax)
    except ValueError:
        return float("nan")


FLAT_BELOW = 0.5  # a member with P_model/P_h (k < kmax, training box) below this has ended flat
DIVERGED_ABOVE = 2.0  # ... above this, or with a mean f off 1 by more than MEAN_F_OFF, has diverged
MEAN_F_OFF = 0.1


def member_health(pk_ratio_lowk: float, mean_f: float) -> dict:
    """{"ok", "reason"} of one member from its low-k P_model/P_h and its mean f over all particles
    of the training box: flat (ratio < FLAT_BELOW: f carries under half the halo power) or diverged
    (non-finite, ratio > DIVERGED_ABOVE, or |mean f - 1| > MEAN_F_OFF)."""
    if not (np.isfinite(pk_ratio_lowk) and np.isfinite(mean_f)):
        return {"ok": False, "reason": f"diverged: non-finite (P ratio {pk_ratio_lowk}, mean f {mean_f})"}
    if pk_ratio_lowk > DIVERGED_ABOVE or abs(mean_f - 1) > MEAN_F_OFF:
        return {"ok": False, "reason": f"diverged: P_model/P_h {pk_ratio_lowk:.3g}, mean f {mean_f:.4g}"}
    if pk_ratio_lowk < FLAT_BELOW:
        return {"ok": False, "reason": f"flat: P_model/P_h {pk_ratio_lowk:.3g} < {FLAT_BELOW}"}
    return {"ok": True, "reason": f"P_model/P_h {pk_ratio_lowk:.4g}, mean f {mean_f:.5f}"}


def member_verdicts(n_members: int, failures: dict, train_result: dict) -> tuple[list[dict], list[int]]:
    """{"ok", "reason"} of every member (training failures first, then :func:`member_health` on the
    training box's evaluation) and the indices of the trained members (rows of the evaluation)."""
    trained = [m for m in range(n_members) if m not in failures]
    out = [{"ok": False, "reason": failures[m]} if m in failures else None for m in range(n_members)]
    for row, m in enumerate(trained):
        out[m] = member_health(train_result["pk_ratio_lowk_members"][row], train_result["mean_f_members"][row])
    for m, h in enumerate(out):
        if not h["ok"]:
            log.warning(f"member {m} is not in the ensemble average: {h['reason']}")
    return out, trained


def _spectra(fft, delta_h, p_h, weight, pos) -> dict:
    """Spectra of the field painted with ``weight`` at ``pos`` (particles already on their slab)."""
    grid = paint(fft.comm, pos, weight, fft.n, fft.box, method="cic", routed=True)
    delta_m = overdensity(fft.comm, grid)
    del grid
    p_m = power_spectrum(fft, delta_m, compensate="cic")["power"]
    p_hm = power_spectrum(fft, delta_m, delta_h, compensate="cic")["power"]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"P_model": p_m, "P_hm": p_hm, "ratio": p_m / p_h, "uncorr": p_m - p_hm**2 / p_h,
                "uncorr_ratio": (p_m - p_hm**2 / p_h) / p_h, "corr": p_hm / np.sqrt(p_m * p_h)}


def evaluate_simulation(comm, f_members, pos: np.ndarray, true_pos: np.ndarray,
                        true_weight: np.ndarray, box: float, nmesh: int, kmax: float = 0.1,
                        average_rows=None) -> dict:
    """Spectra of each member's f and of their average against the true tracers. Returns a dict of
    arrays plus ``pk_ratio_lowk`` (mean of the bins' ratios below kmax), ``pk_ratio_lowk_modes``
    (sum N_k P_model / sum N_k P_h below kmax), their per-member lists, ``mean_f`` (the average f over
    all particles), ``mean_f_members``, ``truth_per_particle`` (the true tracers' summed weight over
    the number of particles) and ``truth_shot_noise`` (sqrt(sum w^2) / sum w of the true tracers:
    the relative Poisson error of that sum when the tracers are halos).

    ``f_members``: the members' f on this rank's particles at ``pos``, as an (M, n) array, or as a
    dict of M 1-d arrays that the routing to the evaluation slabs consumes (cut as they are sent).
    The particles are routed once with all members' f (pos 12 + 4 M B per particle arrive) and every
    field is painted from there. ``average_rows(result) -> rows``: which members the average takes,
    decided from the members' entries of the result (default: all), listed in ``average_rows``."""
    fft = SlabFFT(comm, nmesh, box, dtype=np.float64)
    delta_h = overdensity(comm, paint(comm, true_pos, true_weight, nmesh, box, method="cic"))
    ph = power_spectrum(fft, delta_h, compensate="cic")
    out = {"k": ph["k"], "modes": ph["modes"], "edges": ph["edges"], "P_h": ph["power"]}
    n = max(int(global_sum(comm, np.int64(len(pos)))), 1)
    consume = isinstance(f_members, dict)
    cols = f_members if consume else {f"f{m}": np.asarray(f) for m, f in enumerate(f_members)}
    names = list(cols)
    routed = route_to_slabs(comm, pos, cols, nmesh, box, what="evaluation", consume=consume)
    del cols, f_members
    rpos = routed.pop("pos")
    members = [_spectra(fft, delta_h, ph["power"], routed[name], rpos) for name in names]
    for key in (members[0] if members else {}):
        out[f"{key}_members"] = np.array([m[key] for m in members])
    out["pk_ratio_lowk_members"] = [_lowk(ph["k"], m["ratio"], kmax) for m in members]
    out["pk_ratio_lowk_modes_members"] = [_lowk_modes(ph["k"], ph["modes"], m["P_model"], ph["power"], kmax)
                                          for m in members]
    sums = global_sum(comm, np.array([routed[name].sum(dtype=np.float64) for name in names]))
    out["mean_f_members"] = [float(x) / n for x in np.atleast_1d(sums)]
    rows = list(range(len(names))) if average_rows is None else [int(r) for r in average_rows(out)]
    if not rows:
        raise ValueError("evaluate_simulation: the average takes no member")
    avg = np.zeros(len(rpos), np.result_type(np.float32, *(routed[name].dtype for name in names)))
    for r in rows:
        avg += routed[names[r]]
    avg /= avg.dtype.type(len(rows))
    for name in names:
        routed[name] = None
    out["average_rows"] = rows
    spec = _spectra(fft, delta_h, ph["power"], avg, rpos)
    out.update({f"{k}_avg": v for k, v in spec.items()})
    out["pk_ratio_lowk"] = _lowk(ph["k"], out["ratio_avg"], kmax)
    out["pk_ratio_lowk_modes"] = _lowk_modes(ph["k"], ph["modes"], out["P_model_avg"], ph["power"], kmax)
    out["mean_f"] = float(np.mean([out["mean_f_members"][r] for r in rows]))  # = the average's, exactly
    # the true field's weight per particle: a perfect model's mean f on this box, relative to the
    # training boxes', is the ratio of these (boxes differ by their halo abundance)
    w = np.asarray(true_weight, dtype=np.float64)
    w_sum, w2_sum = global_sum(comm, np.array([w.sum(), np.square(w).sum()]))
    out["truth_per_particle"] = float(w_sum) / n
    # the relative Poisson error of the box's summed true weight when its tracers are independent
    # discrete objects (halos): sqrt(sum w^2) / sum w, the floor of any model's mean f on a new box
    out["truth_shot_noise"] = float(np.sqrt(w2_sum) / w_sum) if w_sum > 0 else float("nan")
    return out
