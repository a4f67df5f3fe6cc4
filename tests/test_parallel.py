"""MPI helpers: checked reductions, stage timer, gathers, logging, fail-fast abort."""
import logging
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lagbias_mpi.core.logs import Progress, get_logger, setup_logging
from lagbias_mpi.mpi.comm import (
    ConsistencyError,
    StageTimer,
    abort_on_exception,
    check_count,
    check_sum,
    gather_slabs,
    global_min_max_mean,
    global_sum,
    peak_rss_mb,
)


@pytest.mark.mpi
def test_check_count(comm):
    assert check_count(comm, comm.rank, comm.rank, "things") == sum(range(comm.size))
    # moved between ranks but conserved: fine
    assert check_count(comm, 5 if comm.rank == 0 else 0, 5 if comm.rank == comm.size - 1 else 0, "x") == 5
    with pytest.raises(ConsistencyError, match="lost: global count changed from"):
        check_count(comm, 10, 10 - (comm.rank == comm.size - 1), "lost")


@pytest.mark.mpi
def test_check_sum_and_global_sum(comm):
    assert check_sum(comm, 1.0, 1.0 + 1e-9, "mass") == pytest.approx(comm.size)
    with pytest.raises(ConsistencyError, match="mass"):
        check_sum(comm, 1.0, 1.0 + 1e-3 * (comm.rank == 0), "mass")
    total = global_sum(comm, np.array([comm.rank, 1], dtype=np.int32))
    assert total.dtype == np.int64 and list(total) == [sum(range(comm.size)), comm.size]
    assert global_sum(comm, 0.5) == pytest.approx(0.5 * comm.size)
    stats = global_min_max_mean(comm, comm.rank)
    assert stats == {"min": 0.0, "mean": pytest.approx((comm.size - 1) / 2), "max": comm.size - 1.0}


@pytest.mark.mpi
def test_stage_timer_reports_max_over_ranks(comm):
    timer = StageTimer(comm)
    with timer.stage("sleep"):
        time.sleep(0.02 + 0.05 * (comm.rank == comm.size - 1))
    with timer.stage("sleep"):  # stages accumulate
        pass
    if comm.rank == 0:  # a stage recorded on one rank only (stage() itself is collective)
        timer.local["rank0-only"] = 0.5
    times = timer.summary()
    assert set(times) == {"sleep", "rank0-only"} and times["rank0-only"] == 0.5
    assert times["sleep"] >= 0.07  # the maximum over ranks: the slow rank's time (no upper bound: not a benchmark)
    assert comm.allgather(times["sleep"]) == [times["sleep"]] * comm.size


@pytest.mark.mpi
def test_gather_slabs(comm):
    def slab_of(rank):  # uneven slabs, rows numbered globally
        start = sum(r % 2 + 1 for r in range(rank))
        return np.stack([np.arange(start, start + rank % 2 + 1), np.full(rank % 2 + 1, rank)], axis=1)

    expected = np.concatenate([slab_of(r) for r in range(comm.size)])
    full = gather_slabs(comm, slab_of(comm.rank))
    np.testing.assert_array_equal(full, expected)  # rank order, every row once
    rooted = gather_slabs(comm, slab_of(comm.rank), root=0)
    if comm.rank == 0:
        np.testing.assert_array_equal(rooted, expected)
    else:
        assert rooted is None


def test_peak_rss_is_at_least_the_current_rss():
    with open("/proc/self/status") as status:
        rss_mb = next(float(line.split()[1]) / 1024.0 for line in status if line.startswith("VmRSS:"))
    assert peak_rss_mb() >= rss_mb > 0


def test_stage_timer_peak_leaves_out_what_ran_before_it():
    """A run's peak RSS is its own: a 300 MB spike freed before the timer is made (say the generation
    of a missing simulation) is not in it; one inside a stage is."""
    from mpi4py import MPI

    spike = np.ones(300 * 2**20 // 8)
    del spike
    timer = StageTimer(MPI.COMM_SELF, track_rss=True)
    assert timer.peak_rss_mb() < timer.baseline_rss_mb + 150
    with timer.stage("work"):
        spike = np.ones(300 * 2**20 // 8)
        del spike
    assert timer.peak_rss_mb() > timer.baseline_rss_mb + 250


@pytest.mark.mpi
def test_abort_on_exception_single_rank_reraises():
    from mpi4py import MPI

    @abort_on_exception(MPI.COMM_SELF)
    def fail():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        fail()


def test_logging_rank0_speaks(comm, capsys):
    logger = setup_logging(comm, "INFO")
    get_logger("test").info("hello %d", 3)
    prog = Progress(comm, 4, "steps", every_s=0.0)
    prog.update(4)
    err = capsys.readouterr().err
    assert f"r0/{comm.size}] I hello 3" in err
    assert "steps [########################] 4/4" in err
    logger.setLevel(logging.WARNING)


ABORT_SCRIPT = textwrap.dedent("""
    from mpi4py import MPI
    from lagbias_mpi.mpi.comm import abort_on_exception
    comm = MPI.COMM_WORLD

    @abort_on_exception(comm)
    def main():
        if comm.rank == 1:
            raise RuntimeError("boom on rank 1")
        comm.Barrier()  # rank 0 would wait here forever without the abort

    main()
""")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not found")
def test_abort_on_exception_ends_a_two_rank_job(tmp_path, mpirun_env):
    script = tmp_path / "abort.py"
    script.write_text(ABORT_SCRIPT)
    # the bound: without the abort rank 0 waits for ever, and run() raises TimeoutExpired after 60 s
    proc = subprocess.run(["mpirun", "--oversubscribe", "-n", "2", sys.executable, str(script)],
                          env=mpirun_env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "[rank 1] FATAL RuntimeError: boom on rank 1" in proc.stderr
