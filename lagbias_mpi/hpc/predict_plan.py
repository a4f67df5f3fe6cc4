"""Memory and time of ``python -m lagbias_mpi.predict`` per rank, beside the training plan.

The prediction of one box holds, per particle of the busiest rank (n_p = N / P after Lagrangian
routing; the paint routing sees the training planner's imbalance): the loaded columns until the
routing is done (24 B; the halos, 28 B each, until the comparison), the routed copy with its
standardised feature rows ``(8 F + 20)`` B, f in float64 (8 B, or 8 B per member with
``output.members``), the paint exchange of (position, weight) records and, for the comparison, the
training evaluation's arrays. Network inputs are made in chunks of 2^20 particles (a constant).
Grid terms: the IC slab, the FFT work of the features, the float64 model field and the evaluation
grids, as in :mod:`lagbias_mpi.hpc.planner`, whose byte counts (``BYTES``) are reused.
"""
from __future__ import annotations

import math
from dataclasses import replace

from lagbias_mpi.hpc.planner import BASELINE_MB, BYTES, MB, RUNTIME_MB, time_per_stage
from lagbias_mpi.hpc.problem import ProblemSize

STAGES = ("load", "features", "routing", "predict", "field", "spectra")


CHUNK = 1 << 20


def predict_memory_per_rank(size: ProblemSize, ranks: int, members: bool = False, particle_f: bool = False,
                            compare: bool = True, imbalance: float | None = None) -> dict:
    """Predicted peak resident memory (bytes) of the busiest rank in each predict stage for the box
    of ``size`` (``size.eval_nmesh`` = ``output.nmesh``, ``size.ensemble`` = members of the model)."""
    P = int(ranks)
    if P < 1:
        raise ValueError("ranks must be >= 1")
    if imbalance is None:
        imbalance = 1.0 if P == 1 else 1.0 + 0.05 * math.log2(P)
    B, F, M = BYTES, size.n_raw, size.ensemble
    n_p = size.n_particles / P
    n_e = n_p * imbalance
    c_ic = math.ceil(size.n_ic / P) * size.n_ic**2
    c_ev = math.ceil(size.eval_nmesh / P) * size.eval_nmesh**2
    base = BASELINE_MB * MB
    halos = B["halo"] * size.n_halos / P if compare else 0.0
    kept = B["load_particle"] * n_p
    ic = B["ic_cell"] * c_ic
    slab = 8 * F * c_ic
    lag_part = (8 * F + 8 + 12) * n_p
    lag_exchange = (B["exchange_copies"] * 48 + 16 + 16 * F) * n_p
    keep = B["fft_cache_cell"] * c_ic if P > 1 else 0.0
    f_bytes = 8 * (M + 1 if members else 1) * n_p
    chunk = CHUNK * (8 * F + 8 * size.n_inputs + 8 * M + 4 * size.width * 2)
    paint = B["exchange_copies"] * 20 * n_e + 8 * c_ev
    pf = (2 * (8 + 4 + (4 * M if members else 0)) * n_p) if particle_f else 0.0
    after = lag_part - 8 * F * n_p + f_bytes  # the feature rows are freed once f is known
    stages = {
        "load": base + kept + halos + ic,
        "features": base + kept + halos + ic + max(B["feature_copies"] * 8 * F * c_ic,
                                                   (8 * F + B["fft_work_cell"]) * c_ic),
        "routing": base + keep + kept + halos + ic + slab + lag_exchange,
        "predict": base + keep + halos + lag_part + f_bytes + chunk,
        "field": base + keep + halos + after + max(paint + 4 * c_ev + B["eval_cell"] * c_ev, pf),
        "spectra": base + keep + halos + after + ((M if members else 1) + 2) * 8 * n_e + 5 * 20 * n_e
                   + B["eval_cell"] * c_ev if compare else base + keep + after,
    }
    runtime = {"load": 0.0, "features": RUNTIME_MB["features"], "routing": RUNTIME_MB["routing"],
               "predict": RUNTIME_MB["routing"], "field": RUNTIME_MB["evaluate"], "spectra": RUNTIME_MB["evaluate"]}
    stages = {k: v + runtime[k] * MB for k, v in stages.items()}
    return {"bytes": stages, "peak_bytes": max(stages.values()), "peak_stage": max(stages, key=stages.get),
            "bytes_per_particle": (max(stages.values()) - base) / max(n_p, 1.0), "particles_per_rank": n_p,
            "imbalance": imbalance}


def predict_time(size: ProblemSize, ranks: int, nodes: int = 1, costs: dict | None = None,
                 members: bool = False) -> dict:
    """Predicted wall time (s) per stage: the training planner's per-unit costs for one box, one
    Lagrangian exchange and one evaluation (average f, plus each member with ``members``)."""
    one = replace(size, n_val=0, ensemble=(size.ensemble + 1) if members else 1)
    t = time_per_stage(one, ranks, nodes, costs)["seconds"]
    stages = {"features": t["features"], "routing": t["routing"] / 2, "predict+field+spectra": t["evaluate"]}
    return {"seconds": stages, "total_s": sum(stages.values())}
