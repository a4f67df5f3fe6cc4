"""The suite cannot hang: under mpirun a test failing (or hanging) on one rank ends the whole job at
once, non-zero, with the failure and the rank shown; every marker is declared; every test has a timeout."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mpi4py import MPI

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun")

ONE_RANK_FAILS = '''
import time
import pytest
from mpi4py import MPI


@pytest.mark.mpi
def test_fails_on_rank_1_before_a_collective():
    world = MPI.COMM_WORLD
    assert world.rank != 1, "deliberate failure on rank 1"
    world.Barrier()  # rank 0 waits here for ever unless the failure on rank 1 ends the job


@pytest.mark.mpi
def test_never_reached():
    time.sleep(1000)
'''

ONE_RANK_HANGS = '''
import time
import pytest
from mpi4py import MPI


@pytest.mark.mpi
def test_rank_1_hangs():
    world = MPI.COMM_WORLD
    if world.rank == 1:
        print("rank 1 is about to hang", flush=True)
        time.sleep(1000)
    world.Barrier()
'''


def _run_child(tmp_path, source, env, extra=()):
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_child.py").write_text(textwrap.dedent(source))
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", "sh", str(ROOT / "scripts" / "pytest_rank.sh"),
           sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--with-mpi", "-m", "mpi",
           "--rootdir", str(tmp_path), *extra, str(tmp_path / "test_child.py")]
    # the bound: a child that does not end within 120 s raises TimeoutExpired and fails this test
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(MPIRUN is None or MPI.COMM_WORLD.size > 1, reason="launches its own mpirun")
def test_one_rank_failure_ends_the_job_with_its_report(tmp_path, mpirun_env):
    res = _run_child(tmp_path, ONE_RANK_FAILS, mpirun_env, extra=["-o", "timeout=600"])
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "rank 1 of 2: test_child.py::test_fails_on_rank_1_before_a_collective FAILED in call" in out, out[-3000:]
    assert "deliberate failure on rank 1" in out
    assert "test_never_reached" not in out.replace("test_never_reached():", "")


@pytest.mark.skipif(MPIRUN is None or MPI.COMM_WORLD.size > 1, reason="launches its own mpirun")
def test_hung_rank_is_ended_by_the_test_timeout_and_its_output_shown(tmp_path, mpirun_env):
    res = _run_child(tmp_path, ONE_RANK_HANGS, mpirun_env, extra=["-o", "timeout=5", "-o", "timeout_method=thread"])
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "Timeout" in out, out[-3000:]
    assert "rank 1 is about to hang" in out, out[-3000:]  # the hidden rank's own output is shown


def test_every_marker_is_declared_and_tests_are_bounded(pytestconfig):
    assert pytestconfig.getoption("strict_markers") or "--strict-markers" in pytestconfig.getini("addopts")
    declared = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
    assert {"mpi", "slow"} <= declared
    assert float(pytestconfig.getini("timeout")) > 0
