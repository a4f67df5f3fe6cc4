"""Shared fixtures. MPI tests are marked ``@pytest.mark.mpi`` and run serially and under mpirun.

Under mpirun (more than one rank) a test that fails or errors on any rank ends the whole job at once:
the failing rank writes its report (test id, phase, rank, traceback) to its real stderr, flushes and
calls ``COMM_WORLD.Abort``, so that no other rank is left waiting in a collective of this test or of
the next one. ``scripts/pytest_rank.sh`` passes the real stderr of every rank in file descriptor
``LAGBIAS_PYTEST_REPORT_FD`` (its own output goes to a log file).
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

import pytest  # noqa: E402
from mpi4py import MPI  # noqa: E402


def _report_stream():
    """The stream a failure report goes to: the rank's real stderr if the launcher passed it."""
    fd = os.environ.get("LAGBIAS_PYTEST_REPORT_FD")
    if fd:
        try:
            return os.fdopen(os.dup(int(fd)), "w")
        except (OSError, ValueError):
            pass
    return sys.stderr


def pytest_runtest_logreport(report):
    """Under MPI, end the whole job as soon as a test fails on this rank (never a hang)."""
    world = MPI.COMM_WORLD
    if world.size == 1 or not report.failed:
        return
    stream = _report_stream()
    stream.write(f"\n=== rank {world.rank} of {world.size}: {report.nodeid} FAILED in {report.when}; "
                 f"aborting the MPI job\n{report.longreprtext}\n"
                 f"=== rank {world.rank}: end of failure report of {report.nodeid}\n")
    for s in (stream, sys.stdout, sys.stderr):
        s.flush()
    time.sleep(0.2)
    world.Abort(1)


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.fixture
def shared_tmp(tmp_path_factory):
    """A temporary directory with the same path on every rank (rank 0 makes it, broadcasts it)."""
    world = MPI.COMM_WORLD
    path = str(tmp_path_factory.mktemp("shared")) if world.rank == 0 else None
    return Path(world.bcast(path, root=0))


@pytest.fixture
def mpirun_env():
    """Environment for a child ``mpirun`` started by a test: root allowed, one thread, the project on
    PYTHONPATH, and none of this process's (singleton) MPI job variables, so that the child does not
    think it is part of it."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LAGBIAS_PYTEST_REPORT_FD", None)
    return {k: v for k, v in env.items()
            if not k.startswith(("OMPI_COMM_WORLD", "OMPI_MCA_ess", "PMIX_", "OMPI_MCA_orte"))}
