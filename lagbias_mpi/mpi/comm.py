"""MPI helpers: fail-fast error handling, checked global reductions, test gathers, memory."""
from __future__ import annotations

import contextlib
import functools
import resource
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.core.memory import release_heap

log = get_logger("parallel")


class ConsistencyError(RuntimeError):
    """A global invariant (particle count, mass) was violated."""


def abort_on_exception(comm):
    """Decorator: an exception on any rank prints its traceback and ends the whole job with
    ``comm.Abort`` (never a hang). On one rank the exception propagates unchanged."""

    def deco(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except SystemExit:
                raise
            except BaseException as exc:  # noqa: BLE001 - we must catch everything to Abort
                if comm.size == 1:
                    raise
                sys.stderr.write(f"[rank {comm.rank}] FATAL {type(exc).__name__}: {exc}\n")
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
                time.sleep(0.2)
                comm.Abort(1)

        return wrapper

    return deco


def global_sum(comm, value):
    """Allreduce sum of a scalar or array (float64 / int64 accumulation)."""
    arr = np.asarray(value)
    acc = np.float64 if arr.dtype.kind == "f" else np.int64
    out = np.empty(arr.shape, dtype=acc)
    comm.Allreduce(np.ascontiguousarray(arr, dtype=acc), out, op=MPI.SUM)
    return out if out.ndim else out[()]


def global_moments(comm, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global mean and standard deviation of each feature column over all grid points (float64
    sums, one column at a time: 16 B per grid point of temporaries, whatever the column count)."""
    flat = feats.reshape(-1, feats.shape[-1])
    count = global_sum(comm, np.int64(flat.shape[0]))
    s1 = global_sum(comm, np.array([flat[:, c].astype(np.float64).sum() for c in range(flat.shape[1])]))
    mean = s1 / count
    s2 = global_sum(comm, np.array([((flat[:, c].astype(np.float64) - mean[c]) ** 2).sum()
                                    for c in range(flat.shape[1])]))
    std = np.sqrt(s2 / count)
    if np.any(std <= 0):
        raise ValueError("a feature has zero variance over the IC grid (constant initial density?)")
    return mean, std


def global_min_max_mean(comm, value: float) -> dict:
    """Min, mean and max over ranks of a per-rank scalar (load-balance reporting)."""
    vals = comm.allgather(float(value))
    return {"min": min(vals), "mean": float(np.mean(vals)), "max": max(vals)}


def check_count(comm, before: int, after: int, what: str) -> int:
    """Check that the global count of ``what`` is unchanged (local counts in, global out)."""
    g_before, g_after = comm.allreduce(int(before)), comm.allreduce(int(after))
    if g_before != g_after:
        raise ConsistencyError(f"{what}: global count changed from {g_before} to {g_after}")
    return g_after


def check_sum(comm, before: float, after: float, what: str, rtol: float = 1e-6) -> float:
    """Check that a global float sum (mass) is conserved to ``rtol``."""
    g_before, g_after = comm.allreduce(float(before)), comm.allreduce(float(after))
    if not np.isclose(g_before, g_after, rtol=rtol, atol=1e-12 * max(abs(g_before), 1.0)):
        raise ConsistencyError(f"{what}: global sum changed from {g_before!r} to {g_after!r}")
    return g_after


def gather_slabs(comm, slab: np.ndarray, root: int | None = None) -> np.ndarray | None:
    """Concatenate the slabs of all ranks along axis 0 (for tests and small diagnostics only).
    With ``root=None`` every rank gets the full array."""
    parts = comm.allgather(slab) if root is None else comm.gather(slab, root=root)
    if parts is None:
        return None
    return np.concatenate(parts, axis=0)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux: VmHWM of this process image; ru_maxrss
    elsewhere, which Linux carries over from the parent across fork + exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """Resident set size of this process now, in MB (VmRSS; the peak where /proc is missing)."""
    now = _status_mb("VmRSS")
    return peak_rss_mb() if now is None else now


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``/proc/self/clear_refs``);
    False where that is not possible (the peak then stays cumulative)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StageTimer:
    """Wall time per named stage, reported as the maximum over ranks. With ``track_rss``, also the
    peak RSS of every stage (the process's peak is reset when a stage starts) and the RSS before
    the first stage (the per-rank baseline: interpreter, libraries). The process's peak is reset when
    the timer is made, so what ran before it (say a missing simulation generated first) is not in
    :meth:`peak_rss_mb`."""

    def __init__(self, comm, track_rss: bool = False):
        self.comm = comm
        self.local: dict[str, float] = {}
        self.track_rss = track_rss
        self.rss_local: dict[str, float] = {}
        self.rss_trace_local: list[tuple[str, float, float]] = []  # (stage, RSS at start, peak) per occurrence
        if track_rss:
            release_heap()
            reset_peak_rss()
        self.baseline_rss_mb = current_rss_mb() if track_rss else None
        self._overall_peak = peak_rss_mb() if track_rss else None

    @contextlib.contextmanager
    def stage(self, name: str):
        self.comm.Barrier()
        if self.track_rss:
            self._overall_peak = max(self._overall_peak, peak_rss_mb())
            release_heap()  # what earlier stages freed into the C heap is not this stage's
            reset_peak_rss()
            start_rss = current_rss_mb()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.local[name] = self.local.get(name, 0.0) + time.perf_counter() - t0
            if self.track_rss:
                peak = peak_rss_mb()
                self.rss_local[name] = max(self.rss_local.get(name, 0.0), peak)
                self.rss_trace_local.append((name, start_rss, peak))
                self._overall_peak = max(self._overall_peak, peak)

    def peak_rss_mb(self) -> float:
        """Peak RSS of this rank over the whole run so far (MB), resets included."""
        return max(self._overall_peak or 0.0, peak_rss_mb())

    def rss_summary(self) -> dict[str, float]:
        """Max over ranks of each stage's peak RSS in MB (collective; empty without ``track_rss``)."""
        names = sorted(set().union(*self.comm.allgather(list(self.rss_local))))
        return {n: self.comm.allreduce(self.rss_local.get(n, 0.0), op=MPI.MAX) for n in names}

    def rss_trace(self) -> list[dict]:
        """Every stage occurrence in order (the training box's, then each validation box's), with
        the max over ranks of its RSS at the start and of its peak, in MB (collective)."""
        local = np.array([[t[1], t[2]] for t in self.rss_trace_local], np.float64).reshape(-1, 2)
        both = np.empty_like(local)
        self.comm.Allreduce(local, both, op=MPI.MAX)  # every rank passed the same stages
        return [{"stage": t[0], "start_mb": float(a), "peak_mb": float(b)}
                for t, (a, b) in zip(self.rss_trace_local, both)]

    def summary(self) -> dict[str, float]:
        """Max over ranks of each stage's wall time (collective)."""
        names = sorted(set().union(*self.comm.allgather(list(self.local))))
        return {n: self.comm.allreduce(self.local.get(n, 0.0), op=MPI.MAX) for n in names}
