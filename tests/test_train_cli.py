"""The command: bad input stops before any work, NaN stops training, a failing rank ends the job."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI
from simfixtures import make_simulation, write_config
from waits import collect_rest, wait_for_line

from lagbias_mpi.train import main
from lagbias_mpi.training import loss as trainer
from lagbias_mpi.training.loop import TrainingDiverged
from lagbias_mpi.workflows.train import run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    sim = make_simulation(d / "a.h5", ppd=16, box=64.0, seed=3)
    return sim, d


@pytest.mark.parametrize("override, message", [
    ("train.foo=1", "train.foo"),
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("features.scales=[1.0, 8.0]", "below the IC grid spacing"),
    ("features.scales=7Rf", "unknown smoothing-scale set"),
    ("simulation.train_files=[/nonexistent/sim.h5]", "not found"),
    ("sampling.frac=1.5", "sampling.frac"),
    ("halos.min_npart=0", "halos.min_npart"),
])
def test_bad_config_stops_before_work(small, capsys, override, message):
    sim, d = small
    cfg = write_config(d / "bad.yaml", sim)
    out = d / "bad_run"
    assert main(["--config", str(cfg), "--set", override, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_config_file(small, capsys):
    assert main(["--config", str(small[1] / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def _spoil_after_first_checkpoint(small, monkeypatch, name, spoil):
    """A quiet config ``<name>.yaml`` and its run directory; from the first checkpoint of member 0 on,
    the batch terms (grid, guard, sum f) of training are replaced by ``spoil(grid, guard, s)``.
    Returns (config, run directory, that checkpoint)."""
    sim, d = small
    cfg = write_config(d / f"{name}.yaml", sim, run={"log_level": "ERROR", "figures": False})
    out = d / f"{name}_run"
    ckpt = out / "checkpoints" / "member_0.pt"
    real = trainer._terms_and_f  # the terms the training objective and the validation loss are made of

    def spoiled(*args, **kwargs):
        grid, guard, s, f = real(*args, **kwargs)
        return (*spoil(grid, guard, s), f) if ckpt.exists() else (grid, guard, s, f)

    monkeypatch.setattr(trainer, "_terms_and_f", spoiled)
    return cfg, out, ckpt


def test_nan_loss_stops_and_keeps_checkpoint(small, monkeypatch):
    cfg, out, ckpt = _spoil_after_first_checkpoint(small, monkeypatch, "nan",
                                                   lambda grid, guard, s: (grid * float("nan"), guard, s))
    with pytest.raises(TrainingDiverged, match="last good checkpoint: .*member_0.pt \\(epoch 1\\)"):
        run(MPI.COMM_SELF, cfg, out=out)
    kept = torch.load(ckpt, weights_only=False)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values())
    assert not (out / "model.pt").exists()


def test_exploding_mean_f_stops(small, monkeypatch):
    """A finite loss with an exploding sum of f (a diverged member: beyond loop.MAX_SUM_OVER_TRUTH
    times the truth's) also stops training."""
    cfg, out, ckpt = _spoil_after_first_checkpoint(small, monkeypatch, "explode",
                                                   lambda grid, guard, s: (grid, guard, s * 1e12))
    with pytest.raises(TrainingDiverged, match="batch sum of f .* diverged"):
        run(MPI.COMM_SELF, cfg, out=out)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1


def _mpirun(args, timeout):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not available")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    cmd = [mpirun, "--oversubscribe", "-n", "2", sys.executable, "-m", "lagbias_mpi.train", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(MPI.COMM_WORLD.size > 1, reason="launches its own mpirun")
def test_cli_under_mpirun(small):
    sim, d = small
    cfg = write_config(d / "cli.yaml", sim, run={"figures": False})
    out = d / "cli_run"
    res = _mpirun(["--config", str(cfg), "--set", "train.epochs=1", "--set", "train.ensemble=1",
                   "--out", str(out)], timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "summary.json").is_file() and (out / "model.pt").is_file()
    import json
    s = json.loads((out / "summary.json").read_text())
    assert s["n_ranks"] == 2 and s["epochs"] == 1 and np.isfinite(s["final_train_loss"])


@pytest.mark.skipif(MPI.COMM_WORLD.size > 1, reason="launches its own mpirun")
def test_exception_on_one_rank_ends_job(small):
    sim, d = small
    cfg = write_config(d / "fail.yaml", sim)
    res = _mpirun(["--config", str(cfg), "--set", "run.fail_on_rank=1", "--out", str(d / "fail_run")],
                  timeout=120)
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr


@pytest.mark.skipif(MPI.COMM_WORLD.size > 1, reason="launches its own process")
def test_sigterm_checkpoints_mid_training_and_resume_finishes(small):
    """A real SIGTERM during training (as a batch system sends before killing or requeueing a job):
    the step under way finishes, a checkpoint is written, the process exits with 128 + 15; --resume
    then completes the run with every epoch in the history."""
    import json
    import signal

    sim, d = small
    cfg = write_config(d / "term.yaml", sim, train={"epochs": 200, "ensemble": 1, "lr": 0.001, "bare_steps": 1},
                       sampling={"frac": 0.5, "batch_size": 300},
                       run={"figures": False, "log_level": "INFO"})
    out = d / "term_run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lagbias_mpi.train", "--config", str(cfg), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = wait_for_line(proc, "member 0 epoch 2/200", timeout_s=180)  # training runs: signal it
    except TimeoutError:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    rest = collect_rest(proc, timeout_s=120)
    log = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "stopped by signal SIGTERM" in log
    ck = torch.load(out / "checkpoints" / "member_0.pt", weights_only=False)
    assert not ck["done"] and 2 <= ck["epoch"] < 200
    assert not (out / "summary.json").exists()
    res = subprocess.run([*cmd, "--resume", "--set", "run.log_level=WARNING"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["loss_history"][0]["epoch"] == list(range(1, 201))
