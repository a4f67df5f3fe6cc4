"""Timings of the distributed primitives (``python -m lagbias_mpi.bench``): FFT pair, CIC paint, exchange,
and the per-unit costs the planner uses.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from lagbias_mpi.core.logs import get_logger

log = get_logger("bench")




BOX = 1000.0  # Mpc/h; irrelevant to the timings


def count(text: str) -> int:
    """A positive count written as ``16777216``, ``2**24``, ``2^24`` or ``4e6``."""
    text = str(text).strip().replace("^", "**")
    try:
        if "**" in text:
            base, exp = text.split("**", 1)
            value = int(base) ** int(exp)
        else:
            value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"count must be >= 1, got {text!r}")
    return value


def plane_field(n: int, start: int, stop: int, seed: int) -> np.ndarray:
    """Planes [start, stop) of a float32 white-noise n^3 field; each plane drawn from (seed, plane)
    so that the field does not depend on the number of ranks."""
    out = np.empty((stop - start, n, n), np.float32)
    for i in range(start, stop):
        out[i - start] = np.random.default_rng([seed, i]).standard_normal((n, n), dtype=np.float32)
    return out


def _timed(comm, func, repeat: int) -> tuple[float, float]:
    """Median wall time and median CPU time (each the max over ranks) of ``repeat`` calls, each
    between barriers. The CPU time is what a shared machine's load does not inflate."""
    wall, cpu = [], []
    for _ in range(repeat):
        comm.Barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        func()
        c1 = time.process_time()
        comm.Barrier()
        wall.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
        cpu.append(comm.allreduce(c1 - c0, op=MPI.MAX))
    return float(np.median(wall)), float(np.median(cpu))


def _bench_fft_backend(comm, n: int, repeat: int, seed: int, backend: str) -> dict:
    """Pair and forward times of one SlabFFT backend (after a warm-up: plans, page faults)."""
    from lagbias_mpi.mpi.fft import SlabFFT

    fft = SlabFFT(comm, n, BOX, np.float32, backend=backend)
    local = plane_field(n, fft.real_start, fft.real_stop, seed)

    def pair():
        fft.backward(fft.forward(local))

    pair()
    wall, cpu = _timed(comm, pair, repeat)
    forward, _ = _timed(comm, lambda: fft.forward(local), repeat)
    return {"wall": wall, "cpu": cpu, "forward": forward, "backend": fft.backend}


def bench_fft(comm, n: int, repeat: int, seed: int = 1) -> dict:
    """r2c + c2r pair with SlabFFT (all ranks) on every installed backend, and with scipy.fft on
    rank 0 (same data). ``fft_s`` etc. are those of the backend in use (``$LAGBIAS_FFT_BACKEND``);
    ``fft_s_by_backend``/``fft_cpu_s_by_backend`` hold every backend and ``scipy`` side by side."""
    import scipy.fft

    from lagbias_mpi.mpi.fft import backend_name
    from lagbias_mpi.mpi.fft_backends import installed_backends

    selected = backend_name()
    by_backend = {name: _bench_fft_backend(comm, n, repeat, seed, name) for name in installed_backends()}
    mine = by_backend[selected]
    res = {"fft_n": n, "fft_s": mine["wall"], "fft_cpu_s": mine["cpu"], "fft_forward_s": mine["forward"],
           "fft_backend": mine["backend"],
           "fft_s_by_backend": {name: b["wall"] for name, b in by_backend.items()},
           "fft_cpu_s_by_backend": {name: b["cpu"] for name, b in by_backend.items()},
           "fft_forward_s_by_backend": {name: b["forward"] for name, b in by_backend.items()},
           "fft_backend_versions": {name: b["backend"]["version"] for name, b in by_backend.items()}}
    scipy_s = (None, None)
    if comm.rank == 0:
        full = plane_field(n, 0, n, seed)  # the field every backend transformed

        def scipy_pair():
            scipy.fft.irfftn(scipy.fft.rfftn(full, workers=1), s=full.shape, axes=(0, 1, 2), workers=1)

        scipy_pair()
        scipy_s = _timed(MPI.COMM_SELF, scipy_pair, repeat)
        del full
    res["fft_scipy_s"], res["fft_scipy_cpu_s"] = comm.bcast(scipy_s, root=0)
    res["fft_s_by_backend"]["scipy"] = res["fft_scipy_s"]
    res["fft_cpu_s_by_backend"]["scipy"] = res["fft_scipy_cpu_s"]
    res["fft_ratio_vs_scipy"] = res["fft_s"] / res["fft_scipy_s"]
    res["fft_cpu_ratio_vs_scipy"] = res["fft_cpu_s"] / res["fft_scipy_cpu_s"]
    return res


def bench_paint(comm, n: int, n_particles: int, repeat: int, seed: int = 2) -> dict:
    """CIC paint of uniform particles already routed to their slab; numpy reference on rank 0."""
    from lagbias_mpi.mesh.paint import cic_numpy_reference, paint, route_to_slabs

    lo = n_particles * comm.rank // comm.size
    hi = n_particles * (comm.rank + 1) // comm.size
    rng = np.random.default_rng([seed, comm.rank])
    pos = ((rng.random((hi - lo, 3), dtype=np.float32) - 0.5) * np.float32(BOX)).astype(np.float32)
    weight = rng.random(hi - lo) + 0.5
    got = route_to_slabs(comm, pos, {"weight": weight}, n, BOX, what="bench particles")
    del pos, weight
    pos, weight = got["pos"], got["weight"]
    paint(comm, pos[:1000], weight[:1000], n, BOX, routed=True, check=False)  # warm-up (JIT/cache)
    paint(comm, pos[:1000], None, n, BOX, routed=True, check=False)
    t_w, c_w = _timed(comm, lambda: paint(comm, pos, weight, n, BOX, routed=True), repeat)
    t_u, _ = _timed(comm, lambda: paint(comm, pos, None, n, BOX, routed=True), repeat)
    res = {"paint_n": n, "paint_particles": n_particles,
           "paint_cic_s": t_w,
           "paint_cic_particles_per_s": n_particles / t_w,
           "paint_cic_particles_per_s_per_rank": n_particles / t_w / comm.size,
           "paint_cic_cpu_particles_per_s_per_rank": n_particles / c_w / comm.size,
           "paint_cic_unit_weight_particles_per_s": n_particles / t_u}
    ratio = (None, None, None)
    if comm.rank == 0:
        # rank 0's particles: numpy reference against our paint of the same particles on one rank
        ref = _timed(MPI.COMM_SELF, lambda: cic_numpy_reference(pos, weight, n, BOX), 1)
        mine = _timed(MPI.COMM_SELF, lambda: paint(MPI.COMM_SELF, pos, weight, n, BOX, routed=True), 1)
        ratio = (ref[0], mine[0] / ref[0], mine[1] / ref[1])
    res["paint_numpy_s_rank0"], res["paint_ratio_vs_numpy"], res["paint_cpu_ratio_vs_numpy"] = comm.bcast(ratio)
    res["paint_particles_rank0"] = comm.bcast(len(pos))
    return res


def bench_exchange(comm, n_particles: int, repeat: int, seed: int = 3) -> dict:
    """Exchange pos + lagr_index + weight to random destinations."""
    from lagbias_mpi.mpi.exchange import exchange

    n = n_particles * (comm.rank + 1) // comm.size - n_particles * comm.rank // comm.size
    rng = np.random.default_rng([seed, comm.rank])
    cols = {"pos": rng.random((n, 3), dtype=np.float32),
            "lagr_index": rng.integers(0, 2**20, (n, 3), dtype=np.int32),
            "weight": rng.random(n)}
    dest = rng.integers(0, comm.size, n)
    stats = {}

    def run():
        _, stats["s"] = exchange(comm, cols, dest, what="bench exchange", return_stats=True)

    run()
    t, _ = _timed(comm, run, repeat)
    moved = comm.allreduce(stats["s"].bytes_sent)
    off_rank = comm.allreduce(int(np.count_nonzero(dest != comm.rank)))
    return {"exchange_particles": n_particles, "exchange_bytes": moved, "exchange_s": t,
            "exchange_MB_per_s": moved / t / 1e6, "exchange_off_rank_fraction": off_rank / n_particles,
            "exchange_s_per_particle_per_rank": t * comm.size / n_particles}


def bench_feature_memory(comm, n: int, box: float = 500.0, seed: int = 4) -> dict:
    """Bytes per IC cell of the feature columns' FFT work (the planner's ``FFT_WORK_CELL``), by
    FFT precision: max over ranks of (peak RSS while the 9 columns of the shipped feature set are
    computed one at a time and dropped - RSS before, with the IC slab held) / IC cells per rank.
    Needs Linux's resettable peak RSS (else NaN)."""
    import gc

    from lagbias_mpi.bias.features import feature_columns
    from lagbias_mpi.config.train import FeatureConfig
    from lagbias_mpi.mpi.comm import current_rss_mb, peak_rss_mb, reset_peak_rss
    from lagbias_mpi.mpi.layout import slab_bounds

    shipped = FeatureConfig()  # the default feature set: 3 scales x (delta, lap, g2)
    out = {}
    start, stop = slab_bounds(n, comm.size, comm.rank)
    cells = max((stop - start) * n * n, 1)
    for precision, dtype in (("float64", np.float64), ("float32", np.float32)):
        warm = plane_field(16, *slab_bounds(16, comm.size, comm.rank), seed)  # FFTW and numpy loaded
        for _ in feature_columns(comm, warm, 64.0, (4.0,), shipped.kinds, dtype=dtype):
            pass
        del warm
        ic = plane_field(n, start, stop, seed)
        gc.collect()
        comm.Barrier()
        before = current_rss_mb()
        ok = reset_peak_rss()
        columns = feature_columns(comm, ic, box, shipped.radii, shipped.kinds, dtype=dtype)
        del ic
        for column in columns:
            del column
        del columns
        gc.collect()
        per_cell = (peak_rss_mb() - before) * 2**20 / cells if ok else float("nan")
        out[precision] = comm.allreduce(per_cell, op=MPI.MAX)
    return {"feature_fft_bytes_per_ic_cell": out, "feature_memory_n": n}


def costs_from(summary: dict) -> dict:
    """Per-unit costs (core-seconds) for the resource planner, from a bench summary. FFT and paint
    costs use the CPU time (robust to other jobs sharing the cores), the exchange its wall time."""
    n3 = float(summary["fft_n"]) ** 3
    p = summary["n_ranks"]
    return {
        "plan": {"route_s_per_particle": summary["exchange_s_per_particle_per_rank"]},
        "fft_float32_s_per_cell_log2": summary["fft_cpu_s"] / 2 * p / (n3 * math.log2(n3)),
        "paint_cic_s_per_particle": 1.0 / summary["paint_cic_cpu_particles_per_s_per_rank"],
        "paint_numpy_cic_s_per_particle": summary["paint_numpy_s_rank0"] / summary["paint_particles_rank0"],
        "exchange_s_per_byte": summary["exchange_s"] / (summary["exchange_bytes"] / p),
        "measured": {"n_ranks": p, "host": summary["versions"].get("host"), "date": summary["date"],
                     "load_average": summary["load_average"], "command": summary["command"]},
        "notes": ("Core-seconds per unit, from `python -m lagbias_mpi.bench --save-costs` (see "
                  "docs/benchmarks.md). 'plan' holds the keys lagbias_mpi.plan.load_costs uses (same "
                  "definition); the others are raw primitive costs: one float32 r2c or c2r per "
                  "N^3 log2 N^3 cells (no feature arithmetic), CIC paint per particle, exchange per byte."),
    }


def run(comm, out: Path, n: int, n_particles: int, repeat: int, exchange_particles: int,
        paint_n: int | None = None, save_costs: Path | None = None, feature_n: int | None = None) -> dict:
    """Run the benchmarks and write ``out/summary.json``. Collective."""
    from lagbias_mpi.core.atomic import write_json
    from lagbias_mpi.mpi.comm import StageTimer, peak_rss_mb
    from lagbias_mpi.mpi.environment import environment_info, fftw_version

    timer = StageTimer(comm)
    summary: dict = {"load_average": {"start": os.getloadavg()[0]}}
    log.info(f"bench on {comm.size} rank(s): FFT {n}^3 float32, paint {n_particles} particles into "
             f"{paint_n or n}^3, exchange {exchange_particles} particles, {repeat} repeats")
    with timer.stage("fft"):
        summary.update(bench_fft(comm, n, repeat))
    log.info("FFT pair by backend (wall s): " + ", ".join(f"{k} {v:.4g}" for k, v in summary["fft_s_by_backend"].items()))
    log.info(f"FFT pair {summary['fft_s']:.4g} s, scipy {summary['fft_scipy_s']:.4g} s, "
             f"ratio {summary['fft_ratio_vs_scipy']:.2f} (CPU time ratio {summary['fft_cpu_ratio_vs_scipy']:.2f})")
    with timer.stage("paint"):
        summary.update(bench_paint(comm, paint_n or n, n_particles, repeat))
    log.info(f"CIC paint {summary['paint_cic_particles_per_s']:.3g} particles/s "
             f"({summary['paint_cic_particles_per_s_per_rank']:.3g} per rank), "
             f"{summary['paint_ratio_vs_numpy']:.3f} x the numpy time")
    with timer.stage("exchange"):
        summary.update(bench_exchange(comm, exchange_particles, repeat))
    log.info(f"exchange {summary['exchange_MB_per_s']:.1f} MB/s "
             f"({summary['exchange_off_rank_fraction']:.0%} of the particles to other ranks)")
    with timer.stage("feature_memory"):
        summary.update(bench_feature_memory(comm, feature_n or n))
    log.info("feature FFT work per IC cell (B): " + ", ".join(
        f"{k} {v:.1f}" for k, v in summary["feature_fft_bytes_per_ic_cell"].items()))
    versions = environment_info(comm)
    versions.update(fft_backend=summary.pop("fft_backend"), fftw=fftw_version())
    for name in ("scipy", "numba"):
        versions[name] = __import__(name).__version__
    rss = comm.allreduce(peak_rss_mb(), op=MPI.MAX)
    summary["load_average"]["end"] = os.getloadavg()[0]  # > number of cores: the timings are inflated
    summary.update(n_ranks=comm.size, versions=versions, peak_rss_mb=rss, stage_s=timer.summary(),
                   date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   command=f"python -m lagbias_mpi.bench --out {out} --n {n} --particles {n_particles} "
                           f"--repeat {repeat} --exchange-particles {exchange_particles}"
                           + (f" --paint-n {paint_n}" if paint_n else "")
                           + (f" --feature-n {feature_n}" if feature_n else ""))
    if comm.rank == 0:
        write_json(Path(out) / "summary.json", summary)
        if save_costs is not None:
            write_json(save_costs, costs_from(summary))
            log.info(f"costs written to {save_costs}")
    comm.Barrier()
    return summary
