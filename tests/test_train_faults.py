"""Training survives faults: a hard kill (SIGKILL of the whole job, no handler runs) then --resume
gives the same model as an uninterrupted run, at 1 and 2 ranks; a damaged checkpoint is refused
with a message naming it on every rank and the previous good one is used."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mpi4py import MPI
from simfixtures import make_simulation, write_config
from waits import kill_session, wait_for_line

from lagbias_mpi.bias.ensemble import load_ensemble
from lagbias_mpi.training.checkpoint import CheckpointError, previous_path
from lagbias_mpi.workflows.train import run

ROOT = Path(__file__).resolve().parent.parent
WORLD = MPI.COMM_WORLD
TRAIN = {"epochs": 10, "ensemble": 1, "dtype": "float64", "seed": 5, "lr": 0.005, "bare_steps": 1}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = Path(WORLD.bcast(str(tmp_path_factory.mktemp("faults")) if WORLD.rank == 0 else None))
    return make_simulation(d / "a.h5", ppd=16, box=64.0, seed=3), d


def _assert_same_models(dir_a, dir_b):
    a, b = load_ensemble(dir_a), load_ensemble(dir_b)
    assert len(a.members) == len(b.members)
    for p, q in zip(a.members, b.members):
        for (k, v), (k2, v2) in zip(p.state_dict().items(), q.state_dict().items()):
            assert k == k2 and torch.allclose(v, v2, rtol=1e-12, atol=1e-14), k


def _command(n_ranks, cfg, out, *extra):
    train = [sys.executable, "-m", "lagbias_mpi.train", "--config", str(cfg), "--out", str(out), *extra]
    if n_ranks == 1:
        return train
    return [shutil.which("mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", str(n_ranks), *train]


@pytest.mark.skipif(WORLD.size > 1, reason="launches its own processes")
@pytest.mark.parametrize("n_ranks", [1, 2])
def test_sigkill_mid_epoch_then_resume_gives_the_same_model(small, mpirun_env, n_ranks):
    if n_ranks > 1 and shutil.which("mpirun") is None:
        pytest.skip("mpirun not available")
    sim, d = small
    cfg = write_config(d / f"kill{n_ranks}.yaml", sim, train={**TRAIN, "checkpoint_steps": 3},
                       sampling={"frac": 0.5, "batch_size": 150}, run={"figures": False, "log_level": "INFO"})
    full, out = d / f"kill_full{n_ranks}", d / f"kill_run{n_ranks}"
    ref = subprocess.run(_command(n_ranks, cfg, full), env=mpirun_env, cwd=ROOT, capture_output=True, text=True,
                         timeout=400)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.Popen(_command(n_ranks, cfg, out), env=mpirun_env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_line(proc, "member 0 epoch 1/10", timeout_s=300)  # epoch 2 under way: kill everything
    finally:
        kill_session(proc)
    assert not (out / "summary.json").exists() and not (out / "model.pt").exists()  # killed before the end
    ckpt = torch.load(out / "checkpoints" / "member_0.pt", weights_only=False)
    assert 1 <= ckpt["epoch"] < 10 and not ckpt["done"]
    res = subprocess.run(_command(n_ranks, cfg, out, "--resume", "--set", "run.log_level=WARNING"), env=mpirun_env,
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_models(full, out)


@pytest.mark.mpi
def test_damaged_checkpoint_refused_and_previous_used(comm, small, capsys):
    sim, d = small
    cfg = write_config(d / f"dmg{comm.size}.yaml", sim, train=TRAIN, sampling={"frac": 0.5, "batch_size": 300},
                       run={"figures": False, "log_level": "WARNING"})
    full, out = d / f"dmg_full{comm.size}", d / f"dmg_run{comm.size}"
    run(comm, cfg, out=full)
    assert run(comm, cfg, out=out, stop_after_epochs=2) is None
    path = out / "checkpoints" / "member_0.pt"
    if comm.rank == 0:
        assert torch.load(previous_path(path), weights_only=False)["epoch"] == 1  # the one it replaced
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    comm.Barrier()
    capsys.readouterr()
    run(comm, cfg, out=out, resume=True)
    err = capsys.readouterr().err
    assert f"checkpoint {path} is damaged and refused" in err  # on every rank
    assert f"using the previous good checkpoint {previous_path(path)} (member 0, epoch 1)" in err
    _assert_same_models(full, out)
    # neither the checkpoint nor the previous one is good: refused on every rank, naming both
    if comm.rank == 0:
        path.write_bytes(b"not a checkpoint")
        torch.save({"epoch": 1}, previous_path(path))
    comm.Barrier()
    with pytest.raises(CheckpointError, match=f"{path} is damaged .*{previous_path(path)} is damaged .*missing"):
        run(comm, cfg, out=out, resume=True)
