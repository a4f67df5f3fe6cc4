"""Memory and time of ``python -m lagbias_mpi.predict`` per rank, beside the training plan.

The prediction of one box holds what training holds for it up to the Lagrangian routing (the shared
terms of :func:`lagbias_mpi.hpc.planner.box_terms`: loaded columns, IC slab, feature FFT work, the
Lagrangian exchange, the routed float32 feature rows + pid + position) and then, per particle of the
busiest rank: f in float32 (4 B, and 4 B per member with ``output.members``), the network inputs
of one chunk of ``CHUNK`` particles (a constant), the CIC paint of (position, f) at the final
positions onto the float64 model field and, for the comparison, the training evaluation's terms.
No Eulerian copy, no batches, no truth on the training grid: below training's peak for the same box.
"""
from __future__ import annotations

from dataclasses import replace

from lagbias_mpi.core.memory import ROWS_PER_STEP
from lagbias_mpi.hpc.planner import BYTES, MB, RUNTIME_MB, box_terms, time_per_stage
from lagbias_mpi.hpc.problem import ProblemSize

STAGES = ("load", "features", "routing", "predict", "field", "spectra")


CHUNK = ROWS_PER_STEP  # particles turned into network inputs at a time (lagbias_mpi.workflows.predict)


def predict_memory_per_rank(size: ProblemSize, ranks: int, members: bool = False, particle_f: bool = False,
                            compare: bool = True, imbalance: float | None = None) -> dict:
    """Predicted peak resident memory (bytes) of the busiest rank in each predict stage for the box
    of ``size`` (``size.eval_nmesh`` = ``output.nmesh``, ``size.ensemble`` = members of the model).
    ``imbalance``: max/mean particles per slab of the paint (default as the training planner's)."""
    t = box_terms(size, ranks, imbalance, positions_aside=True)  # on disk while the columns are computed
    B, F, M = BYTES, size.n_raw, size.ensemble
    n_p, n_e, c_ev = t["n_p"], t["n_e"], t["c_ev"]
    base = t["base"]
    halos = t["halos"] if compare else 0.0
    f_bytes = 4 * (M + 1 if members else 1) * n_p
    # one chunk: theta float32 and its float64 temporaries, y and f of every member, activations
    chunk = CHUNK * (8 * F + 4 * size.n_inputs + 16 * M + 4 * size.width * 2)
    # the positions wait on disk until f is known and the feature rows are freed
    after = t["lag_set"] + 12 * n_p - 4 * F * n_p + f_bytes
    # the paint's routing: positions and f arrive beside the int32 destinations, one chunk's buckets
    paint = (12 + 4 + B["dest_particle"]) * n_e + t["steps"] + B["eval_cell"] * c_ev
    pf = (8 + 8 + 4 + (4 * M if members else 0)) * n_p if particle_f else 0.0  # sort order, pid, f copies
    stages = {
        "load": base + t["loaded"] + t["ic"] + halos,
        # the loaded columns are dropped once routed (the planted comparison paints the routed ones)
        "features": base + halos + t["features"],
        "routing": base + halos + t["lag_set"],
        "predict": base + halos + t["lag_set"] + f_bytes + chunk,
        "field": base + halos + after + max(paint, pf),
        "spectra": base + halos + after + (paint if compare else 0.0),
    }
    runtime = {"load": 0.0, "features": RUNTIME_MB["features"], "routing": RUNTIME_MB["routing"],
               "predict": RUNTIME_MB["routing"], "field": RUNTIME_MB["evaluate"], "spectra": RUNTIME_MB["evaluate"]}
    stages = {k: v + runtime[k] * MB for k, v in stages.items()}
    return {"bytes": stages, "peak_bytes": max(stages.values()), "peak_stage": max(stages, key=stages.get),
            "bytes_per_particle": (max(stages.values()) - base) / max(n_p, 1.0), "particles_per_rank": n_p,
            "imbalance": t["imbalance"]}


def predict_time(size: ProblemSize, ranks: int, nodes: int = 1, costs: dict | None = None,
                 members: bool = False) -> dict:
    """Predicted wall time (s) per stage: the training planner's per-unit costs for one box, one
    Lagrangian exchange and one evaluation (average f, plus each member with ``members``)."""
    one = replace(size, n_val=0, ensemble=(size.ensemble + 1) if members else 1)
    t = time_per_stage(one, ranks, nodes, costs)["seconds"]
    stages = {"features": t["features"], "routing": t["routing"] / 2, "predict+field+spectra": t["evaluate"]}
    return {"seconds": stages, "total_s": sum(stages.values())}
