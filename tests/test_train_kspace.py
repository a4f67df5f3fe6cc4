"""Fourier-space loss (train.kspace_loss): its gradient against torch.fft, rank-count invariance."""
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI
from simfixtures import make_simulation, write_config
from waits import self_run

from lagbias_mpi.bias.model import build_model, f_of_y
from lagbias_mpi.mpi.comm import gather_slabs
from lagbias_mpi.mpi.fft import SlabFFT
from lagbias_mpi.training.kspace import (
    build_field_set,
    kspace_coefficients,
    kspace_loss_and_gradient,
)
from lagbias_mpi.workflows.train import run

WORLD = MPI.COMM_WORLD
N, BOX = 8, 64.0


def _full_cut(k_cut):
    k = np.fft.fftfreq(N, 1.0 / N) * 2 * np.pi / BOX
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    return torch.as_tensor((k2 <= k_cut**2).astype(np.float64))


def _torch_loss(r, k_cut):
    rk = torch.fft.fftn(r)
    cut = _full_cut(k_cut)
    return (cut * rk.abs() ** 2).sum() / cut.sum()


@pytest.mark.mpi
@pytest.mark.parametrize("k_cut", [0.2, 1e9])
def test_loss_and_gradient_match_torch_fft(comm, k_cut):
    """Distributed loss and dL/dr equal torch.fft + autograd of the full field on one rank; without
    a cut the loss is sum r^2 (Parseval); a field of the highest k only has no loss below the cut."""
    r_full = np.random.default_rng(3).standard_normal((N, N, N))
    fft = SlabFFT(comm, N, BOX, np.float64)
    cut = (fft.local_k2() <= k_cut**2).astype(np.float64)
    loss, grad = kspace_loss_and_gradient(comm, fft, cut, r_full[fft.real_start:fft.real_stop])
    rt = torch.tensor(r_full, requires_grad=True)
    lt = _torch_loss(rt, k_cut)
    lt.backward()
    assert loss == pytest.approx(lt.item(), rel=1e-12)
    assert np.allclose(gather_slabs(comm, grad), rt.grad.numpy(), rtol=1e-10, atol=1e-12)
    if k_cut > 1e3:
        assert loss == pytest.approx(float((r_full**2).sum()), rel=1e-12)
    i = np.arange(N)
    checker = (-1.0) ** (i[:, None, None] + i[None, :, None] + i[None, None, :])  # k = Nyquist only
    loss_hi, _ = kspace_loss_and_gradient(comm, fft, cut, checker[fft.real_start:fft.real_stop])
    assert loss_hi == pytest.approx(N**3 if k_cut > 1e3 else 0.0, abs=1e-9)


def test_kspace_coefficients_give_the_parameter_gradient():
    """The coefficients c_i (chunked field, NumPy FFT) give, through sum_i c_i f_i, the parameter
    gradient of weight * L_k(delta_model - delta_true) written with torch.fft and autograd; c is 0
    for particles not selected."""
    comm = MPI.COMM_SELF
    rng = np.random.default_rng(5)
    n_part, n_in, weight, k_cut = 3000, 4, 0.7, 0.25
    cell = rng.integers(0, N**3, n_part)
    pid = np.arange(n_part)
    theta = rng.standard_normal((n_part, n_in))
    truth = rng.standard_normal((N, N, N))
    fs = build_field_set(comm, theta, cell, pid, truth, N, BOX, n_part, 0.5, 7, 0, k_cut, dtype=torch.float64)
    assert 0 < len(fs.idx) < n_part
    model = build_model({"n_in": n_in, "width": 8, "depth": 2, "activation": "gelu"}, seed=1, dtype=torch.float64)
    with torch.no_grad():  # the output layer starts at zero (f = 1); give every layer a gradient
        model.net[-1].weight.copy_(torch.linspace(-0.3, 0.3, model.net[-1].weight.numel()).reshape(model.net[-1].weight.shape))
    loss, coef = kspace_coefficients(comm, model, fs, weight, chunk=500)
    assert coef.shape == (n_part,) and np.all(np.delete(coef, fs.sel) == 0)
    (torch.as_tensor(coef[fs.sel]) * f_of_y(model(fs.x)).reshape(-1)).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    f = f_of_y(model(fs.x)).reshape(-1)
    cellsum = torch.zeros(N**3, dtype=torch.float64).index_add(0, torch.as_tensor(fs.idx), f)
    dm = torch.as_tensor(fs.scale) * cellsum - 1.0
    lt = weight * _torch_loss((dm - torch.as_tensor(truth.reshape(-1))).reshape(N, N, N), k_cut)
    lt.backward()
    assert loss == pytest.approx(lt.item(), rel=1e-10)
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-8, atol=1e-12)
        assert float(p.grad.abs().max()) > 0


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    d = Path(WORLD.bcast(str(tmp_path_factory.mktemp("ksp")) if WORLD.rank == 0 else None))
    return make_simulation(d / "a.h5", seed=21), make_simulation(d / "b.h5", seed=22), d


@pytest.mark.mpi
@pytest.mark.parametrize("polish", [False, True])
def test_kspace_training_rank_invariant(comm, sims, polish):
    """A training with the Fourier-space loss (and with the full-batch phase after it, whose
    objective then holds the loss too) does not depend on the rank count."""
    a, b, d = sims
    train = {"epochs": 2, "ensemble": 1, "dtype": "float64", "seed": 7, "bare_steps": 1,
             "kspace_loss": {"enabled": True, "chunk": 3000}}
    if polish:
        train.update(constraint="projection", grid_loss="poisson", polish={"evaluations": 4, "check_every": 2})
    tag = f"{comm.size}{'p' if polish else ''}"
    cfg = write_config(d / f"k{tag}.yaml", a, [b], train=train, run={"log_level": "WARNING", "figures": False})
    s = run(comm, cfg, out=d / f"k_run{tag}")
    ref = self_run(comm, run, cfg, out=d / f"k_ref{tag}")
    h, r = s["loss_history"][0], ref["loss_history"][0]
    if polish:
        rec, rec1 = h["polish"], r["polish"]
        assert rec["evaluations"][-1] >= 2 and rec["train_loss"][-1] < rec["train_loss"][0]
        assert np.allclose(rec["train_loss"], rec1["train_loss"], rtol=1e-6)
    assert len(h["kspace_loss"]) == 2 and s["kspace_k_cut"] == pytest.approx(1 / 16.0)
    for key in ("train_loss", "val_loss", "kspace_loss"):
        assert np.allclose(h[key], r[key], rtol=1e-6, atol=0, equal_nan=True), key
    assert np.isclose(s["pk_ratio_lowk_val"], ref["pk_ratio_lowk_val"], rtol=1e-6)


@pytest.mark.mpi
def test_kspace_loss_in_the_full_batch_phase_only(comm, sims):
    """kspace_loss.in_epochs false: the epochs are those of a training without the loss (the same
    losses up to rounding), the full-batch phase's objective holds it (its start above the plain
    run's by the Fourier-space loss of the epochs' model); the run does not depend on the rank count."""
    a, b, d = sims
    train = {"epochs": 2, "ensemble": 1, "dtype": "float64", "seed": 7, "bare_steps": 1, "constraint": "projection",
             "grid_loss": "poisson", "polish": {"evaluations": 4, "check_every": 2}}
    quiet = {"log_level": "WARNING", "figures": False}
    plain = write_config(d / f"kp_plain{comm.size}.yaml", a, [b], train=train, run=quiet)
    only = write_config(d / f"kp_only{comm.size}.yaml", a, [b], run=quiet, train={
        **train, "kspace_loss": {"enabled": True, "chunk": 3000, "in_epochs": False}})
    h0 = run(comm, plain, out=d / f"kp_plain_run{comm.size}")["loss_history"][0]
    s = run(comm, only, out=d / f"kp_only_run{comm.size}")
    h1 = s["loss_history"][0]
    assert "kspace_loss" not in h1 and s["kspace_k_cut"] == pytest.approx(1 / 16.0)
    for key in ("train_loss", "mean_f"):  # (the last val_loss is the final model's: after the phase)
        assert np.allclose(h1[key], h0[key], rtol=1e-10), key
    assert h1["polish"]["train_loss"][0] > h0["polish"]["train_loss"][0] * (1 + 1e-6)
    # the loss of the epochs' model is ~100x the grid term here: the first line search runs out of
    # its check's evaluations while extending the step and the second steps into overflow; the
    # phase keeps the lower point found, backs off from the overflow and goes on (it stalled before)
    rec = h1["polish"]
    assert "stopped" not in rec and rec["check"] == [0, 1, 2], rec.get("stopped")
    assert rec["train_loss"][2] < 0.5 * rec["train_loss"][1] < 0.5 * rec["train_loss"][0]
    ref = self_run(comm, run, only, out=d / f"kp_only_ref{comm.size}")["loss_history"][0]
    assert np.allclose(h1["polish"]["train_loss"], ref["polish"]["train_loss"], rtol=1e-6)


def test_kspace_loss_only_in_the_phase_needs_the_phase():
    from lagbias_mpi.config.train import KSpaceLossConfig, PolishConfig, TrainConfig

    with pytest.raises(ValueError, match="in_epochs"):
        TrainConfig(constraint="projection", kspace_loss=KSpaceLossConfig(enabled=True, in_epochs=False))
    cfg = TrainConfig(constraint="projection", polish=PolishConfig(evaluations=3),
                      kspace_loss=KSpaceLossConfig(enabled=True, in_epochs=False))
    assert not cfg.kspace_loss.in_epochs
