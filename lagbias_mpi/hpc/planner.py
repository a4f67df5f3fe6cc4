"""Resource planner: memory per rank and time per stage of a training job, before it is submitted.

``python -m lagbias_mpi.plan --config FILE.yaml --nodes N --cores-per-node C --mem-per-node GIB
[--gpus-per-node G] [--ranks-per-node R] [--set key=value ...] [--costs FILE] [--out plan.json]``

From the sizes in the training config (box, ppd, IC grid, particles after sub-sampling, training and
evaluation grids, scales and feature kinds, ensemble, epochs, validation boxes) it predicts, per
stage, the resident memory of the busiest rank and the wall time, says whether the job fits the
nodes, and finds the smallest node count that fits. Sizes come from the simulate config (built-in
simulation), the simulation files' metadata (``train_files``) or the AbacusSummit box class of
``simulation.abacus.train``, so no data has to be present.

Memory model (``memory_per_rank``): every array ``lagbias_mpi.train`` holds at the peak of each stage,
with its dtype (``BYTES``), for the design of issue #11: one box in memory at a time (validation
boxes are prepared and evaluated one by one after training); the particles routed to their IC
plane before the features, each feature column computed and read out at them in turn (no feature
slab), FFT work in ``features.fft_precision``; float32 features and inputs; an exchange consumes its input as its output fills (one copy of the
records, int32 destinations, rounds of bounded size); batches that index the inputs (4 B per
selected particle) plus the activations of one batch; chunked steps of ``ROWS_PER_STEP`` rows;
float64 evaluation grids. On top: the measured resident memory of an idle training process
(``BASELINE_MB``) and its size-independent growth during the run (``RUNTIME_MB``). Checked against
real runs in docs/supercomputer.md and tests/test_plan.py.

Time model (``time_per_stage``): per-unit costs measured on this machine (``DEFAULT_COSTS``;
``python -m lagbias_mpi.bench --save-costs`` writes the user's costs file (:func:`user_costs_path`), whose matching
keys are preferred) times the work per rank. Inter-node communication is only counted as injection
bandwidth: treat times at many nodes as lower bounds.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lagbias_mpi.bias.orthogonalise import COVARIANCE_CHUNK as COV_CHUNK_ROWS
from lagbias_mpi.core.memory import ROWS_PER_STEP
from lagbias_mpi.hpc.problem import ProblemSize
from lagbias_mpi.mpi.exchange import EXCHANGE_CHUNK_BYTES as EXCHANGE_CHUNK

GiB = 1024**3


MB = 1024**2


# Measured here (Python 3.11, torch 2.13 CPU, Open MPI 4.1): resident memory of a training process
# once its modules are imported and MPI is up (BASELINE_MB), and the run-time growth on top of it by
# the end of each stage, independent of the problem size (torch autograd and thread pools, numba
# kernels, matplotlib figures): sampled from /proc/self/status during a 32^3-particle run.
BASELINE_MB = 370.0


RUNTIME_MB = {"load": 0.0, "features": 20.0, "routing": 40.0, "orthogonalise": 40.0, "train": 90.0,
              "evaluate": 170.0}


BYTES = {
    "load_particle": 24,      # lagr_index int32 x3 + pos float32 x3
    "ic_cell": 4,             # the IC slab, float32
    "act_copies": 6,          # per hidden layer and batch particle: linear, GELU, their grads, Adam
    "eval_cell": 56,          # model + true fields float64, their r2c slabs, paint ghost planes
    "dest_particle": 4,       # int32 destination rank of every particle of an exchange
    "chunk_row": 64,          # temporaries per row of one chunked step (ROWS_PER_STEP rows): hash
                              # priorities, sort orders, float64 copies, the paint's bucket buffers
    "halo": 28,               # pos float32 x3 + npart int64 + mass float64
}


# Bytes per IC cell of the feature columns' FFT work (delta_k, k^2, the scale's W delta_k, one
# column, the tidal kernel, its product and transform, the FFT library's arrays), on one rank and on
# more (mpi4py-fft's transposes): measured peak RSS over the IC slab held, 192^3, 3 scales x (delta,
# lap, g2), by features.fft_precision (docs/supercomputer.md).
FFT_WORK_CELL = {"float64": (78, 114), "float32": (47, 64)}


def fft_work_cell(precision: str, ranks: int) -> float:
    """Bytes per IC cell of the feature FFT work at ``precision`` on ``ranks`` ranks."""
    one, more = FFT_WORK_CELL[precision]
    return float(one if ranks == 1 else more)


# Seconds per unit per rank on this machine (2-core VM, Open MPI 4.1, torch 2.13 CPU, float64 FFTs),
# fitted to the stage times of a 96^3-particle, 192^3-IC training run (docs/supercomputer.md);
# replaced key by key by lagbias_mpi/data/costs.json from the benchmark when present.
DEFAULT_COSTS = {
    "fft_s_per_cell_log2": 3.3e-9,       # one r2c or c2r of N^3 (+ its share of the feature arithmetic)
    "route_s_per_particle": 4.0e-7,      # one exchange (hash, sort, pack, Alltoallv, unpack) per particle
    "orth_s_per_particle_feature2": 2e-9,  # covariance + projection, per particle per F^2
    # forward + backward + Adam per selected particle per epoch, and one evaluation of the full-batch
    # phase per selected particle (oneDNN off): `scaling local --ranks 1 2` on the default config,
    # 2.1e6 selected particles, epoch 11.9 / 7.7 s, evaluation 12.8 / 6.7 s at 1 / 2 ranks
    # (5.7e-6 / 7.3e-6 and 6.1e-6 / 6.3e-6 core-seconds per particle; the mean of the two counts)
    "train_s_per_particle_epoch": 6.5e-6,
    "polish_s_per_particle_eval": 6.2e-6,
    # one refresh of the Fourier-space loss's coefficients (train.kspace_loss), per selected
    # particle: a forward pass without gradient and the cell sums (its two FFTs of the training grid
    # are counted with fft_s_per_cell_log2)
    "kspace_s_per_particle_refresh": 1.7e-6,
    "build_s_per_particle": 2.5e-6,      # per-cell sub-sampling and batch construction, per particle
    "eval_s_per_particle_member": 1.0e-5,  # network, CIC paint and spectra per particle per member
    "eval_fixed_s": 2.0,                 # figures and spectra files
    "train_fixed_s": 2.0,                # torch start-up and the bare-MLP rate measurement
    "comm_s_per_byte_internode": 1.0e-10,  # ~10 GB/s injection bandwidth per node (not measured here)
    "source": "plan.py defaults, measured on the development VM",
}


STAGES = ("load", "features", "routing", "orthogonalise", "train", "evaluate")
GPU_TRAIN_SPEEDUP = 20.0  # estimate: an A100 runs this MLP ~20x faster than one CPU core


SHIPPED_COSTS_PATH = Path(__file__).resolve().parents[1] / "data" / "costs.json"
COSTS_ENV = "LAGBIAS_COSTS"


def user_costs_path() -> Path:
    """Where ``bench --save-costs`` writes and the planner looks first: ``$LAGBIAS_COSTS``, else
    ``$XDG_CACHE_HOME/lagbias_mpi/costs.json`` (default ``~/.cache``); never the installed package."""
    if os.environ.get(COSTS_ENV):
        return Path(os.environ[COSTS_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lagbias_mpi" / "costs.json"


def load_costs(path: str | None = None) -> dict:
    """Per-unit costs: ``path``, else the user's costs (:func:`user_costs_path`), else the costs shipped
    with the package (measured on the development machine), else defaults. Keys missing from a
    file keep their default."""
    costs = dict(DEFAULT_COSTS)
    if path:
        cand = Path(path)
        if not cand.is_file():
            raise FileNotFoundError(f"costs file not found: {path}")
    else:
        cand = next((c for c in (user_costs_path(), SHIPPED_COSTS_PATH) if c.is_file()), None)
    if cand is not None:
        got = json.loads(cand.read_text())
        got = got.get("plan", got) if isinstance(got, dict) else {}
        used = {k: float(v) for k, v in got.items() if k in DEFAULT_COSTS and k != "source"}
        if used:
            costs.update(used)
            costs["source"] = f"{cand} ({', '.join(sorted(used))}); others: plan.py defaults"
    return costs


def box_terms(size: ProblemSize, ranks: int, imbalance: float | None = None, positions_aside: bool = False) -> dict:
    """The bytes per rank of the arrays that every command holds for one box (load, IC features,
    Lagrangian routing), shared by the training and the predict models: ``n_p`` particles per rank
    after Lagrangian routing, ``n_e`` after Eulerian routing (x ``imbalance``), cells per rank of the
    IC (``c_ic``), evaluation (``c_ev``) and training (``c_tr``) grids, and the byte terms.
    ``positions_aside``: the routed positions wait on disk while the columns are computed
    (``lagbias_mpi.train``'s ``run.scratch_dir``), not in ``lag_set``."""
    P = int(ranks)
    if P < 1:
        raise ValueError("ranks must be >= 1")
    if imbalance is None:
        imbalance = 1.0 if P == 1 else 1.02
    B, F = BYTES, size.n_raw
    n_p = size.n_particles / P  # after loading and Lagrangian routing (uniform lattice)
    c_ic = math.ceil(size.n_ic / P) * size.n_ic**2
    loaded = B["load_particle"] * n_p
    lag_set = (4 * F + 8 + (0 if positions_aside else 12)) * n_p  # raw float32 + pid (+ pos) after the readout
    ic = B["ic_cell"] * c_ic
    steps = B["chunk_row"] * min(ROWS_PER_STEP, n_p)  # one chunked step's temporaries
    # the Lagrangian exchange consumes its input as its output fills (one copy of the records plus
    # destinations and one round), then the columns one at a time: the routed particles with their
    # raw rows beside the FFT work of one column (each chunk's IC offsets computed from the ids)
    lagrangian = loaded + B["dest_particle"] * n_p + 3 * min(EXCHANGE_CHUNK, B["load_particle"] * n_p)
    columns = lag_set + fft_work_cell(size.fft_precision, P) * c_ic + steps
    return {"P": P, "imbalance": imbalance, "n_p": n_p, "n_e": n_p * imbalance, "c_ic": c_ic,
            "c_ev": math.ceil(size.eval_nmesh / P) * size.eval_nmesh**2,
            "c_tr": math.ceil(size.train_nmesh / P) * size.train_nmesh**2,
            "base": BASELINE_MB * MB, "halos": B["halo"] * size.n_halos / P, "loaded": loaded,
            "ic": ic, "lag_set": lag_set, "lagrangian": lagrangian, "columns": columns, "steps": steps,
            "features": ic + max(lagrangian, columns)}


def memory_per_rank(size: ProblemSize, ranks: int, imbalance: float | None = None) -> dict:
    """Predicted peak resident memory (bytes) of the busiest rank in each stage, and the total peak.

    Follows ``lagbias_mpi.train`` (issue #11 design): one box in memory at a time (the training box
    through training and its evaluation, then each validation box alone); float32 features and
    inputs theta; the Eulerian exchange carries theta + pid + position only; exchanges go in rounds
    of ``EXCHANGE_CHUNK`` bytes into preallocated results and cut their inputs as they send, so an
    exchange holds about one record per particle. Cells are owned in ranges balanced by particle count:
    ``imbalance`` (max/mean particles per rank after Eulerian routing) defaults to 1 on one rank,
    else 1.02 (measured: docs/supercomputer.md).
    """
    t = box_terms(size, ranks, imbalance, positions_aside=True)
    P, imbalance, n_p, n_e = t["P"], t["imbalance"], t["n_p"], t["n_e"]
    c_ic, c_ev, c_tr = t["c_ic"], t["c_ev"], t["c_tr"]
    base, halos, loaded, ic = t["base"], t["halos"], t["loaded"], t["ic"]
    lag_set, features = t["lag_set"], t["features"]
    B, F, m = BYTES, size.n_raw, size.n_inputs
    steps = t["steps"]
    n_cells = float(size.train_nmesh) ** 3
    eul_rec = 4 * m + 8 + 12  # theta float32 + pid + pos
    prepared = (eul_rec + 4) * n_e  # + the int32 cell id
    training_set = prepared - 12 * n_e  # the positions wait on disk while the members train (run.scratch_dir)
    chunk = 3 * min(EXCHANGE_CHUNK, eul_rec * n_p)  # packed send rows, receive buffer, row targets of one round
    keep = 0.0  # nothing of the FFTs outlives the feature stage (gc after it; measured, issue #11)
    # theta filled while the raw rows are cut (4 max(F, m) B, beside pid; the positions are read
    # back from the scratch directory after it), then the Eulerian exchange consuming
    # its input (one copy + int32 destinations + a round), then the rows sorted by cell in place
    # (int32 cell and destination, 1 B flag); the ownership from the sparse local cell counts
    # (16 B per occupied cell: the rank's slab of cells and a margin of 8 planes) sent to the
    # plane slabs (int64 counts and their cumulative sum per slab cell, int64 per owned cell)
    occupied = min(n_p, n_cells / P + 8 * size.train_nmesh**2)
    ownership = 16 * occupied + 2 * 8 * c_tr + 8 * n_cells / P * imbalance
    eulerian = max((4 * max(F, m) + 8) * n_p, (eul_rec + B["dest_particle"]) * n_e + chunk,
                   (eul_rec + 9) * n_e) + steps + ownership
    truth = 8 * n_cells / P * imbalance + 2 * 8 * c_tr  # owned values + the NGP slab and its copy
    sel = size.n_selected / P * imbalance
    batches = 4 * sel + 20 * c_tr  # int32 row per selected particle; first row, scale, weight, target per cell
    # the full-batch phase (train.polish) keeps every batch's cell sums of f (float32) per evaluation
    polish = 4 * c_tr if size.polish_evaluations else 0
    # the Fourier-space loss (train.kspace_loss, training.kspace.FieldSet): a copy of the selected
    # particles' inputs with their int64 index and cell (4 m + 16 B), the float64 coefficient of
    # every particle, per owned cell scale, truth, cell sums and the residual there and back (40 B),
    # per FFT slab cell the cut, the residual, its transform and gradient (float64 / complex128: 40 B)
    kspace = ((4 * m + 16) * sel + 8 * n_e + 40 * n_cells / P * imbalance + 40 * c_tr
              if size.kspace_refresh_steps else 0)
    select = 1 * n_e + steps  # the selection mask; sub-sampling and batch sort a chunk of cells at a time
    acts = size.batch_size / P * imbalance * size.depth * size.width * 4 * B["act_copies"]
    acts += (4 * m + 16) * size.batch_size / P * imbalance  # the batch's gathered inputs, f and cell index
    # the box used up: positions, the members' f (float32) consumed by one routing to the slabs
    # (positions + every member's f arrive), their average, the float64 grids; the validation
    # boxes' losses (batches of the prepared box) are computed in this stage before
    evaluate = max((12 + B["dest_particle"] + 12 + 4 * size.ensemble + 4) * n_e + steps,
                   prepared + batches + select) + B["eval_cell"] * c_ev
    stages = {
        "load": base + loaded + ic + halos,
        "features": base + halos + features,  # Lagrangian routing, then the columns read out
        "routing": base + keep + halos + eulerian + truth,
        "orthogonalise": base + keep + halos + lag_set + 8 * F * min(n_p, COV_CHUNK_ROWS),
        "train": base + keep + halos + training_set + truth + batches + polish + kspace + max(select, acts),
        "evaluate": base + keep + halos + truth + evaluate,
    }
    stages = {k: v + RUNTIME_MB[k] * MB for k, v in stages.items()}
    return {"bytes": stages, "peak_bytes": max(stages.values()), "peak_stage": max(stages, key=stages.get),
            "imbalance": imbalance, "particles_per_rank": n_p, "ic_cells_per_rank": c_ic,
            "eval_cells_per_rank": c_ev, "baseline_bytes": base,
            "bytes_per_particle": {k: (v - base - RUNTIME_MB[k] * MB) / max(n_p, 1) for k, v in stages.items()}}


def time_per_stage(size: ProblemSize, ranks: int, nodes: int = 1, costs: dict | None = None,
                   gpus: int = 0) -> dict:
    """Predicted wall time (s) of each stage on ``ranks`` ranks (lower bounds across nodes: only
    the injection bandwidth of the routing traffic is counted)."""
    c = dict(DEFAULT_COSTS, **(costs or {}))
    P = int(ranks)
    F, S = size.n_raw, 1 + size.n_val
    n_p = size.n_particles / P
    n_transforms = 1 + size.n_scales * (1 + (size.n_kinds >= 2) + 6 * (size.n_kinds >= 3))
    n3 = float(size.n_ic) ** 3
    features = S * c["fft_s_per_cell_log2"] * n3 * math.log2(n3) / P * n_transforms
    off_node = 0.0 if nodes <= 1 else (1 - 1 / nodes)
    route_bytes = (48 + 8 * F + 36) * n_p * P / max(nodes, 1)  # bytes leaving one node
    routing = S * (2 * c["route_s_per_particle"] * n_p + off_node * route_bytes * c["comm_s_per_byte_internode"])
    orth = c["orth_s_per_particle_feature2"] * n_p * F * F
    speedup = GPU_TRAIN_SPEEDUP if gpus else 1.0
    per_epoch = c["train_s_per_particle_epoch"] * size.n_selected / P / speedup  # validation only after training
    # the full-batch phase (train.polish): per evaluation a forward pass and a forward and backward
    # pass over the selected particles, one Reduce + Bcast of the gradient
    per_eval = c["polish_s_per_particle_eval"] * size.n_selected / P / speedup
    # the Fourier-space loss: per refresh a forward pass over the selected particles and two FFTs of
    # the training grid, ``kspace_refreshes_per_epoch`` per epoch and one per evaluation of the phase
    n3_tr = float(size.train_nmesh) ** 3
    per_refresh = (c["kspace_s_per_particle_refresh"] * size.n_selected / P / speedup
                   + 2 * c["fft_s_per_cell_log2"] * n3_tr * math.log2(max(n3_tr, 2.0)) / P)
    if size.kspace_refresh_steps:
        per_epoch += size.kspace_refreshes_per_epoch * per_refresh  # 0 with in_epochs false
        per_eval += per_refresh
    train = size.ensemble * (size.epochs * per_epoch + size.polish_evaluations * per_eval
                             + c["build_s_per_particle"] * n_p * S) + c["train_fixed_s"]
    evaluate = S * c["eval_s_per_particle_member"] * n_p * size.ensemble + c["eval_fixed_s"]
    stages = {"features": features, "routing": routing, "orthogonalise": orth, "train": train,
              "evaluate": evaluate}
    return {"seconds": stages, "total_s": sum(stages.values()), "epoch_s": per_epoch,
            "polish_s": size.polish_evaluations * per_eval}


def max_ranks(size: ProblemSize) -> int:
    """Most ranks the slab decomposition allows: one plane per rank of the IC and evaluation FFTs."""
    return min(size.n_ic, size.eval_nmesh)


def plan_job(size: ProblemSize, nodes: int, cores_per_node: int, mem_per_node_gb: float,
             gpus_per_node: int = 0, ranks_per_node: int | None = None, costs: dict | None = None,
             mem_reserve: float = 0.1) -> dict:
    """Memory and time of the job on ``nodes`` nodes and whether it fits (``mem_reserve`` of the
    node memory is left to the OS and MPI). Without ``ranks_per_node``: one rank per core (per GPU
    on GPU nodes), fewer when the slab FFTs allow fewer ranks in total (idle cores then give their
    memory to the ranks of the node)."""
    if nodes < 1 or cores_per_node < 1 or mem_per_node_gb <= 0:
        raise ValueError("nodes, cores per node and memory per node must be positive")
    slots = gpus_per_node if gpus_per_node else cores_per_node
    rpn = ranks_per_node or max(1, min(slots, max_ranks(size) // nodes))
    ranks = nodes * rpn
    limits = []
    if ranks > max_ranks(size):
        limits.append(f"{ranks} ranks > {max_ranks(size)} planes of the IC / evaluation grid (slab FFT limit)")
    mem = memory_per_rank(size, ranks)
    if mem["particles_per_rank"] * mem["imbalance"] >= 2**31:
        limits.append("more than 2^31 particles per rank in one exchange")
    avail = mem_per_node_gb * GiB * (1 - mem_reserve) / rpn
    t = time_per_stage(size, ranks, nodes, costs, gpus_per_node)
    fits = mem["peak_bytes"] <= avail and not limits
    return {"nodes": nodes, "ranks_per_node": rpn, "ranks": ranks, "memory": mem,
            "available_bytes_per_rank": avail, "time": t, "fits": fits, "limits": limits}


def smallest_fit(size: ProblemSize, cores_per_node: int, mem_per_node_gb: float, gpus_per_node: int = 0,
                 ranks_per_node: int | None = None, costs: dict | None = None, max_nodes: int = 8192):
    """Plan of the smallest node count that fits (doubling, then bisection), or None."""
    def plan(n):
        return plan_job(size, n, cores_per_node, mem_per_node_gb, gpus_per_node, ranks_per_node, costs)

    lo, hi = 0, 1
    while not plan(hi)["fits"]:
        lo, hi = hi, hi * 2
        if hi > max_nodes:
            return None
    while hi - lo > 1:  # memory per node falls with the node count: bisection is safe
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if plan(mid)["fits"] else (mid, hi)
    return plan(hi)


def format_table(size: ProblemSize, plan: dict, best: dict | None) -> str:
    """Human-readable table of a plan."""
    gb = GiB
    mem, t = plan["memory"], plan["time"]
    lines = [f"problem: box {size.box:g} Mpc/h, {size.ppd}^3 lattice, {size.n_particles:.4g} particles loaded, "
             f"IC {size.n_ic}^3, training grid {size.train_nmesh}^3, eval grid {size.eval_nmesh}^3, "
             f"{size.n_scales} scales x {size.n_kinds} kinds, {size.n_selected:.4g} selected, "
             f"{size.n_val} validation sim(s), ensemble {size.ensemble} x {size.epochs} epochs",
             f"job: {plan['nodes']} node(s) x {plan['ranks_per_node']} ranks = {plan['ranks']} ranks; "
             f"available {plan['available_bytes_per_rank'] / gb:.2f} GiB per rank",
             "", "| stage | memory per rank [GiB] | time [s] |", "|---|---|---|"]
    for st in STAGES:
        tt = t["seconds"].get(st)
        lines.append(f"| {st} | {mem['bytes'][st] / gb:.3f} | {'—' if tt is None else f'{tt:.4g}'} |")
    lines.append(f"| **peak / total** | **{mem['peak_bytes'] / gb:.3f}** ({mem['peak_stage']}) | "
                 f"**{t['total_s']:.4g}** |")
    lines.append("")
    lines.append(f"fits: {'YES' if plan['fits'] else 'NO'}" + (f" ({'; '.join(plan['limits'])})" if plan['limits'] else ""))
    lines.append(f"time per epoch: {t['epoch_s']:.4g} s")
    if t.get("polish_s"):
        lines.append(f"full-batch phase per member: {t['polish_s']:.4g} s ({size.polish_evaluations} evaluations)")
    if size.kspace_refresh_steps:
        lines.append(f"Fourier-space loss: {size.kspace_refreshes_per_epoch} refreshes per epoch of "
                     f"{size.n_batches} batches (in the time per epoch) and one per evaluation of the phase")
    if best is None:
        lines.append("smallest node count that fits: none up to the search limit")
    else:
        lines.append(f"smallest node count that fits: {best['nodes']} ({best['ranks']} ranks, peak "
                     f"{best['memory']['peak_bytes'] / gb:.2f} GiB per rank, ~{best['time']['total_s'] / 3600:.3g} h)")
    return "\n".join(lines) + "\n"
