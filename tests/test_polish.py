"""The full-batch phase (``train.polish``): its objective and gradient equal plain autograd of the
whole set's grid term of f scaled to the true sum on one rank, at 1/2/3 ranks (empty ranks
included) with bit-identical gradients on every rank; it lowers the objective; the trained model does
not depend on the rank count; its configuration is validated."""
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI
from simfixtures import make_simulation, write_config
from waits import self_run

from lagbias_mpi.bias.ensemble import load_ensemble
from lagbias_mpi.bias.model import build_model, f_of_y
from lagbias_mpi.config.train import KSpaceLossConfig, PolishConfig, TrainConfig
from lagbias_mpi.mpi.cells import CellOwnership
from lagbias_mpi.mpi.layout import plane_owner
from lagbias_mpi.training.kspace import build_field_set
from lagbias_mpi.training.batches import build_batches
from lagbias_mpi.training.loss import evaluate_loss
from lagbias_mpi.training.polish import KSpaceTerm, polish_member, set_loss, set_loss_and_gradient
from lagbias_mpi.workflows.train import run

NG, NPART, BOX = 6, 3000, 60.0
SHAPE = {"n_in": 3, "width": 8, "depth": 2, "activation": "gelu"}


def _particles():
    rng = np.random.default_rng(21)
    cell = rng.integers(0, NG**3 // 2, NPART)  # only the first half of the planes: some ranks hold nothing
    pid = rng.permutation(NPART).astype(np.uint64)
    theta = rng.standard_normal((NPART, 3))
    return theta, cell, pid


def _target(cells):
    return np.maximum(np.sin(cells * 0.37) * 2.0, -1.0)  # a halo field's: empty cells included


def _batches(comm, theta, cell, pid):
    return build_batches(comm, theta, cell, pid, _target, NG**3, NPART, frac=0.5, batch_size=400, seed=3,
                         member=0, dtype=torch.float64)


def _model():
    model = build_model(SHAPE, seed=5, dtype=torch.float64)
    with torch.no_grad():
        model.net[-1].bias.fill_(-4.7)  # some y below the guard's -5
    return model


def _kspace_reference(c, fs, batches, cell, weight, k_cut):
    """weight * sum_{|k| <= k_cut} |r_k|^2 / n_cut of r = c scale_j sum_{i in j} f_i - 1 - delta_true
    on the whole grid (torch.fft, autograd), the scale counted in numpy from the whole particle set."""
    sel = np.concatenate([cell[b.pidx] for b in batches.batches])
    n_all = np.bincount(cell, minlength=NG**3)
    n_sel = np.bincount(sel, minlength=NG**3)
    scale = torch.as_tensor(np.where(n_sel > 0, NG**3 / NPART * n_all / np.maximum(n_sel, 1), 0.0))
    cellsum = torch.zeros(NG**3, dtype=torch.float64).index_add(0, torch.as_tensor(sel), torch.cat(fs))
    r = c * scale * cellsum - 1.0 - torch.as_tensor(_target(np.arange(NG**3)))
    k = np.fft.fftfreq(NG, 1.0 / NG) * 2 * np.pi / BOX
    cut = torch.as_tensor((k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2 <= k_cut**2) * 1.0)
    return weight * (cut * torch.fft.fftn(r.reshape(NG, NG, NG)).abs() ** 2).sum() / cut.sum()


def _reference(model, batches, cell, grid_loss, kspace=None):
    """One rank, plain autograd, every batch in one graph: w_i = n_j / n_sel_j counted in numpy from
    the whole particle set, c = T / sum_i w_i f_i, m_j = c scale_j sum_{i in j} f_i, the gradient
    through c included (no surrogate); ``kspace`` = (weight, k_cut) adds the Fourier-space loss of
    the same field."""
    all_cells, n_all = np.unique(cell, return_counts=True)
    fs, ws, ms_parts, ts, guard = [], [], [], [], 0.0
    for batch in batches.batches:
        y = model(batch.x)
        f = f_of_y(y)
        sel = cell[batch.pidx]
        cells, n_sel = np.unique(sel, return_counts=True)
        w = (n_all[np.searchsorted(all_cells, cells)] / n_sel)[np.searchsorted(cells, sel)]
        local = torch.as_tensor(np.searchsorted(cells, sel))
        fs.append(f)
        ws.append(torch.as_tensor(w))
        ms_parts.append((batch.scale, torch.zeros(len(cells), dtype=f.dtype).index_add_(0, local, f)))
        ts.append(1.0 + torch.as_tensor(_target(cells)))
        guard = guard + (torch.clamp(y + 5.0, max=0) ** 4).sum()
    t_total = NPART / NG**3 * float(sum(t.sum() for t in ts))
    c = t_total / sum((w * f).sum() for w, f in zip(ws, fs))
    grid = 0.0
    for (scale, cs), t in zip(ms_parts, ts):
        m = c * scale * cs
        if grid_loss == "mse":
            grid = grid + ((m - t) ** 2).sum()
        else:
            tlog = torch.where(t > 0, t * torch.log(torch.where(t > 0, t, 1.0) / m), torch.zeros_like(t))
            grid = grid + 2 * (tlog - t + m).sum()
    loss = grid + guard
    if kspace is not None:
        loss = loss + _kspace_reference(c, fs, batches, cell, *kspace)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.mpi
@pytest.mark.parametrize("grid_loss", ["mse", "poisson"])
def test_set_objective_and_gradient_equal_one_rank_autograd(comm, grid_loss):
    theta, cell, pid = _particles()
    mine = plane_owner(cell // NG**2, NG, comm.size) == comm.rank
    dist = _batches(comm, theta[mine], cell[mine], pid[mine])
    ref_set = _batches(MPI.COMM_SELF, theta, cell, pid)
    assert len(dist) == len(ref_set) > 2
    model = _model()
    loss = set_loss_and_gradient(comm, model, dist, -5.0, grid_loss)
    assert np.isclose(set_loss(comm, model, dist, -5.0, grid_loss), loss, rtol=1e-12)
    ref_loss, ref_grads = _reference(_model(), ref_set, cell, grid_loss)
    assert np.isclose(loss, ref_loss, rtol=1e-10)
    # the validation loss under the projection: the same objective per batch, no constraint term;
    # its mean f that of the penalty's evaluation
    val, mean_f = evaluate_loss(comm, _model(), dist, 1e-4, -5.0, grid_loss, projection=True)
    assert np.isclose(val, ref_loss / len(ref_set), rtol=1e-10)
    assert np.isclose(mean_f, evaluate_loss(comm, _model(), dist, 1e-4, -5.0, grid_loss)[1], rtol=1e-12)
    grads = [p.grad for p in model.parameters()]
    scale = max(float(r.abs().max()) for r in ref_grads)
    assert scale > 0
    for g, r in zip(grads[:-1], ref_grads[:-1]):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-10 * scale)
    # the objective is blind to the normalisation of f: the reference's output-bias gradient is
    # rounding noise, the phase's is exactly 0
    assert float(ref_grads[-1].abs().max()) < 1e-8 * scale and float(grads[-1].abs().max()) == 0.0
    flat = np.concatenate([g.numpy().ravel() for g in grads] + [[loss]])
    assert all(np.array_equal(flat, other) for other in comm.allgather(flat))  # identical bits on every rank


@pytest.mark.mpi
@pytest.mark.parametrize("k_cut", [0.11, 1e9])
def test_set_objective_with_the_fourier_space_loss_equals_one_rank_autograd(comm, k_cut):
    """With train.kspace_loss the phase's objective adds weight * L_k of the field of f scaled by
    c = T / S: value and gradient (the part through c included) equal torch.fft + autograd of the
    whole set on one rank, at 1/2/3 ranks with ranks that own no particle; identical bits on every
    rank. k_cut 0.11 h/Mpc keeps k = 0 and the first shell (k_f = 0.105), 1e9 every mode."""
    theta, cell, pid = _particles()
    mine = plane_owner(cell // NG**2, NG, comm.size) == comm.rank
    dist = _batches(comm, theta[mine], cell[mine], pid[mine])
    own = CellOwnership.by_planes(NG, comm.size)
    lo, hi = own.bounds(comm.rank)
    field = build_field_set(comm, theta[mine], cell[mine], pid[mine], _target(np.arange(lo, hi)), NG, BOX, NPART,
                            0.5, 3, 0, k_cut, dtype=torch.float64, ownership=own)
    assert len(field.idx) == sum(len(b.pidx) for b in dist.batches)  # the batches' selection
    weight = 0.3
    term = KSpaceTerm([field], weight, chunk=700)
    model = _model()
    loss = set_loss_and_gradient(comm, model, dist, -5.0, "poisson", term)
    assert np.isclose(set_loss(comm, model, dist, -5.0, "poisson", term), loss, rtol=1e-12)
    plain = set_loss(comm, model, dist, -5.0, "poisson")
    assert loss > plain  # the Fourier-space term is there
    ref_loss, ref_grads = _reference(_model(), _batches(MPI.COMM_SELF, theta, cell, pid), cell, "poisson",
                                     (weight, k_cut))
    assert np.isclose(loss, ref_loss, rtol=1e-10)
    grads = [p.grad for p in model.parameters()]
    scale = max(float(r.abs().max()) for r in ref_grads)
    for g, r in zip(grads[:-1], ref_grads[:-1]):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-10 * scale)
    assert float(ref_grads[-1].abs().max()) < 1e-8 * scale and float(grads[-1].abs().max()) == 0.0
    flat = np.concatenate([g.numpy().ravel() for g in grads] + [[loss]])
    assert all(np.array_equal(flat, other) for other in comm.allgather(flat))


@pytest.mark.mpi
def test_a_step_that_does_not_lower_the_objective_is_undone(comm, monkeypatch):
    """A failed line search (here: L-BFGS's second step replaced by one that turns the parameters
    into nan, as an overflow of f would) is undone and ends the phase: the model is the first
    check's, the record says why; the phase never leaves a worse model (it stopped the scaling runs
    of a 2-batch box with a nan loss)."""
    theta, cell, pid = _particles()
    mine = plane_owner(cell // NG**2, NG, comm.size) == comm.rank
    dist = _batches(comm, theta[mine], cell[mine], pid[mine])
    tcfg = TrainConfig(constraint="projection", grid_loss="poisson", polish=PolishConfig(evaluations=9, check_every=3))
    real_step, calls, saved = torch.optim.LBFGS.step, [], []

    def failing_step(self, closure):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                for p in self._params:
                    p.fill_(float("nan"))
            return None
        return real_step(self, closure)
    monkeypatch.setattr(torch.optim.LBFGS, "step", failing_step)
    model = _model()
    rec = polish_member(comm, 0, model, dist, [], tcfg, saved.append)
    assert len(calls) == 2 and rec["check"] == [0, 1] and "step was undone" in rec["stopped"]
    assert rec["train_loss"][1] < rec["train_loss"][0]
    assert np.isclose(set_loss(comm, model, dist, -5.0, "poisson"), rec["train_loss"][1], rtol=1e-12)
    assert saved and saved[-1]["record"]["stopped"] == rec["stopped"]


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """(train file, val file, directory) of a 32^3-particle planted simulation, 128 Mpc/h."""
    d = Path(MPI.COMM_WORLD.bcast(str(tmp_path_factory.mktemp("polish")) if MPI.COMM_WORLD.rank == 0 else None))
    return make_simulation(d / "a.h5", seed=1), make_simulation(d / "b.h5", seed=2), d


TRAIN = {"epochs": 2, "ensemble": 1, "dtype": "float64", "seed": 5, "bare_steps": 1, "constraint": "projection",
         "grid_loss": "poisson", "polish": {"evaluations": 6, "check_every": 3}}


@pytest.mark.mpi
def test_polish_lowers_the_objective_and_does_not_depend_on_the_rank_count(comm, sims):
    a, b, d = sims
    cfg = write_config(d / f"pol{comm.size}.yaml", a, [b], train=TRAIN, run={"log_level": "WARNING", "figures": False})
    s = run(comm, cfg, out=d / f"pol_run{comm.size}")
    ref = self_run(comm, run, cfg, out=d / f"pol_ref{comm.size}")
    rec, rec1 = s["loss_history"][0]["polish"], ref["loss_history"][0]["polish"]
    assert rec["evaluations"] == [0, 3, 6] and rec["check"] == [0, 1, 2] and rec["iterations"][-1] >= 2
    assert rec["train_loss"][-1] < 0.9 * rec["train_loss"][0]  # L-BFGS lowers the whole set's objective
    assert np.allclose(rec["train_loss"], rec1["train_loss"], rtol=1e-6)
    assert rec["evaluations"] == rec1["evaluations"]
    probe = np.random.default_rng(0).standard_normal((200, 6))
    f_p = load_ensemble(d / f"pol_run{comm.size}").predict_f(probe, standardised=True)
    f_1 = load_ensemble(d / f"pol_ref{comm.size}").predict_f(probe, standardised=True)
    assert np.allclose(f_p, f_1, rtol=1e-5)
    assert abs(s["mean_f"] - 1.0) < 1e-6  # the constraint over all training particles still holds


@pytest.mark.parametrize("bad, match", [
    ({"evaluations": -1}, "evaluations"), ({"check_every": 0}, "check_every"), ({"history": 0}, "history")])
def test_polish_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        PolishConfig(**bad)


def test_polish_needs_projection():
    with pytest.raises(ValueError, match="projection"):
        TrainConfig(polish=PolishConfig(evaluations=5))  # the paper's penalty
    assert TrainConfig(constraint="projection", polish=PolishConfig(evaluations=5)).polish.evaluations == 5
    both = TrainConfig(constraint="projection", polish=PolishConfig(evaluations=5),
                       kspace_loss=KSpaceLossConfig(enabled=True))
    assert both.kspace_loss.enabled and both.polish.evaluations == 5
