"""Waiting for rank 0 in tests without spinning and without waiting for ever."""
import time

from mpi4py import MPI


def wait_for_rank0(comm, timeout_s: float = 240.0, what: str = "rank 0") -> None:
    """A barrier that sleeps while it waits (so that rank 0 gets the CPU) and gives up after
    ``timeout_s`` seconds with an error (which, under mpirun, ends the job via tests/conftest.py)."""
    req = comm.Ibarrier()
    deadline = time.monotonic() + timeout_s
    while not req.Test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {comm.rank}: {what} did not reach the barrier within {timeout_s:.0f} s")
        time.sleep(0.01)


def self_run(comm, func, *args, timeout_s: float = 240.0, **kwargs):
    """``func(MPI.COMM_SELF, *args, **kwargs)`` on rank 0 while the other ranks wait; result broadcast."""
    result = func(MPI.COMM_SELF, *args, **kwargs) if comm.rank == 0 else None
    wait_for_rank0(comm, timeout_s, what=f"rank 0's COMM_SELF run of {getattr(func, '__name__', func)}")
    return comm.bcast(result, root=0)


def wait_for_line(proc, marker: str, timeout_s: float) -> list[str]:
    """Lines of ``proc.stdout`` (text mode) read until one contains ``marker``; the wait is bounded:
    a reader thread feeds a queue and ``TimeoutError`` (with the lines so far) is raised after
    ``timeout_s`` seconds or if the process ends first. The thread keeps draining the pipe."""
    import queue
    import threading

    lines: "queue.Queue[str | None]" = queue.Queue()

    def reader():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise TimeoutError(f"no line with {marker!r} within {timeout_s:.0f} s:\n{''.join(seen)[-3000:]}") from None
        if line is None:
            raise TimeoutError(f"process ended (exit {proc.wait()}) before a line with {marker!r}:\n{''.join(seen)[-3000:]}")
        seen.append(line)
        if marker in line:
            proc._lagbias_lines = lines  # the rest, for collect_rest
            return seen


def collect_rest(proc, timeout_s: float) -> str:
    """The rest of the output of a process read by :func:`wait_for_line`, waiting at most ``timeout_s``."""
    try:
        proc.wait(timeout=timeout_s)
    except BaseException:
        proc.kill()
        raise
    lines, rest = proc._lagbias_lines, []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except Exception:  # noqa: BLE001 - queue.Empty
            break
        if line is None:
            break
        rest.append(line)
    return "".join(rest)


def session_pids(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid`` (Linux /proc)."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state ppid pgrp session
            pids.append(int(entry))
    return pids


def kill_session(proc, timeout_s: float = 30.0) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and everything in its session (an
    mpirun and its ranks, which have process groups of their own): a hard kill of the whole job, no
    handler runs. Waits until none is left."""
    import os
    import signal

    deadline = time.monotonic() + timeout_s
    while True:
        pids = session_pids(proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.poll()
        if not pids:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {pids} of session {proc.pid} survive SIGKILL")
        time.sleep(0.05)
    proc.wait(timeout=timeout_s)
