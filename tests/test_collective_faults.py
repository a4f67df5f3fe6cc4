"""An exception on one rank in the middle of a collective (inside a DDP training step, inside a
particle exchange) ends the whole job with its message, for ``train`` and for ``simulate``: never a
hang. The failure is injected with LAGBIAS_FAIL_AT (lagbias_mpi/core/faults.py)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mpi4py import MPI
from simfixtures import make_simulation, write_config

from lagbias_mpi.core.faults import InjectedFailure, fail_point

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = shutil.which("mpirun")
needs_mpirun = pytest.mark.skipif(MPIRUN is None or MPI.COMM_WORLD.size > 1, reason="launches its own mpirun")


def _mpirun(env, point, *command):
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-m", *command]
    # the bound: a job left hanging raises TimeoutExpired after 180 s and fails the test
    return subprocess.run(cmd, env=dict(env, LAGBIAS_FAIL_AT=f"{point}@1"), cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


@needs_mpirun
@pytest.mark.parametrize("point", ["ddp_step", "exchange"])
def test_train_failure_mid_collective_ends_the_job(tmp_path, mpirun_env, point):
    sim = make_simulation(tmp_path / "a.h5", ppd=16, box=64.0, seed=3)
    cfg = write_config(tmp_path / "fail.yaml", sim, train={"epochs": 2, "ensemble": 1, "bare_steps": 1},
                       run={"figures": False, "log_level": "WARNING"})
    res = _mpirun(mpirun_env, point, "lagbias_mpi.train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert res.returncode != 0
    assert f"[rank 1] FATAL InjectedFailure: LAGBIAS_FAIL_AT={point}@1: injected failure at {point} on rank 1" \
        in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "run" / "summary.json").exists()


@needs_mpirun
def test_simulate_failure_mid_exchange_ends_the_job(tmp_path, mpirun_env):
    res = _mpirun(mpirun_env, "exchange", "lagbias_mpi.simulate", "--out", str(tmp_path / "sim"),
                  "--set", "box=64.0", "--set", "ppd=16", "--set", "n_ic=32", "--set", "pm.n_steps=2",
                  "--set", "output.figures=false", "--log-level", "WARNING")
    assert res.returncode != 0
    assert "[rank 1] FATAL InjectedFailure: LAGBIAS_FAIL_AT=exchange@1: injected failure at exchange on rank 1" \
        in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "sim" / "summary.json").exists()


def test_fail_point_names_its_point_and_rank(monkeypatch):
    comm = MPI.COMM_SELF
    fail_point(comm, "exchange")  # unset: nothing happens
    monkeypatch.setenv("LAGBIAS_FAIL_AT", "exchange@0")
    fail_point(comm, "ddp_step")  # another point: nothing happens
    with pytest.raises(InjectedFailure, match="injected failure at exchange on rank 0"):
        fail_point(comm, "exchange")
    monkeypatch.setenv("LAGBIAS_FAIL_AT", "exchange@1")
    fail_point(comm, "exchange")  # another rank: nothing happens
    monkeypatch.setenv("LAGBIAS_FAIL_AT", "nowhere@0")
    with pytest.raises(ValueError, match="must be one of"):
        fail_point(comm, "exchange")
