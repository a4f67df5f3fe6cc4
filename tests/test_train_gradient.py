"""The distributed step's gradient equals the gradient of the whole-batch loss on one rank, and the
weighted integral constraint (S = sum_i n_j/n_sel_j f_i, N = sum_j n_j, T from the true field) equals
a direct numpy computation."""
import gc

import numpy as np
import pytest
import torch
from mpi4py import MPI

from lagbias_mpi.bias.model import build_model, f_of_y
from lagbias_mpi.mpi.layout import plane_owner
from lagbias_mpi.training import ddp
from lagbias_mpi.training.batches import build_batches
from lagbias_mpi.training.loss import batch_terms, cell_sums, local_objective, projected_grid

NG, NPART = 6, 3000
SHAPE = {"n_in": 3, "width": 8, "depth": 2, "activation": "gelu"}


def _all_particles():
    rng = np.random.default_rng(12)
    cell = rng.integers(0, NG**3 // 2, NPART)  # only the first half of the planes: some ranks empty
    pid = rng.permutation(NPART).astype(np.uint64)
    theta = rng.standard_normal((NPART, 3))
    return theta, cell, pid


def _target(cells):
    return np.sin(cells * 0.37) * 2.0


def _target_halos(cells):
    """delta_true >= -1 (empty cells included), as a halo field's."""
    return np.maximum(np.sin(cells * 0.37) * 2.0, -1.0)


def _batches(comm, theta, cell, pid, target=_target):
    return build_batches(comm, theta, cell, pid, target, NG**3, NPART, frac=0.5, batch_size=400, seed=3,
                         member=0, dtype=torch.float64)


def _model():
    model = build_model(SHAPE, seed=5, dtype=torch.float64)
    with torch.no_grad():
        model.net[-1].bias.fill_(-4.9)  # some y below -5: the guard term is active
    return model


def _direct_constraint(batch, cell, f, target=_target):
    """(S, N, T) of ``batch`` from the whole particle set in numpy: n_j counted from ``cell``, n_sel_j
    from the batch's selected particles, T = N_part/N_cells sum_j (1 + target_j)."""
    sel_cells = cell[batch.pidx]
    cells, n_sel = np.unique(sel_cells, return_counts=True)
    all_cells, n_all = np.unique(cell, return_counts=True)
    n = n_all[np.searchsorted(all_cells, cells)]
    w = (n / n_sel)[np.searchsorted(cells, sel_cells)]
    return float(np.sum(w * f)), int(n.sum()), float(NPART / NG**3 * np.sum(1 + target(cells)))


def _numpy_weights(batch, cell):
    """w_i = n_j / n_sel_j of the batch's particles, counted in numpy from the whole particle set."""
    sel_cells = cell[batch.pidx]
    cells, n_sel = np.unique(sel_cells, return_counts=True)
    all_cells, n_all = np.unique(cell, return_counts=True)
    return torch.as_tensor((n_all[np.searchsorted(all_cells, cells)] / n_sel)[np.searchsorted(cells, sel_cells)])


def _reference_grad(batch, cell, eps, others, guard_y=-5.0):
    """Plain autograd of the whole-batch loss on one rank, the constraint built from numpy weights."""
    model = _model()
    y = model(batch.x)
    f = f_of_y(y)
    cellsum = torch.zeros_like(batch.scale).index_add_(0, batch.idx, f)
    loss = ((batch.scale * cellsum - 1 - batch.target) ** 2).sum() + (torch.clamp(y - guard_y, max=0) ** 4).sum()
    s, n, t = _direct_constraint(batch, cell, f.detach().numpy())
    w = _numpy_weights(batch, cell)
    bias = model.net[-1].bias
    s_t = (w * f.detach()).sum() * torch.pow(10.0, bias - bias.detach()).sum()  # the constraint moves the bias only
    assert np.isclose(float(s_t.detach()), s, rtol=1e-12)
    s_o, t_tot, n_tot = others
    assert np.isclose(t_tot - t, 1000.0) and n_tot - n == 1100  # the others of the test: as built there
    loss = loss + ((s_o + s_t - t_tot) / n_tot) ** 2 / eps**2
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()], (s, n, t)


@pytest.mark.mpi
def test_gradient_equals_one_rank_whole_batch(comm):
    theta, cell, pid = _all_particles()
    mine = plane_owner(cell // NG**2, NG, comm.size) == comm.rank
    dist = _batches(comm, theta[mine], cell[mine], pid[mine])
    ref_set = _batches(MPI.COMM_SELF, theta, cell, pid)
    assert len(dist) == len(ref_set) and dist.n_selected == ref_set.n_selected
    eps = 0.05
    with ddp.process_group(comm):
        for b in range(len(dist)):
            model = _model()
            dmodel = ddp.wrap(model, comm)
            db = dist.batches[b]
            others = (1234.5, db.true_sum + 1000.0, db.n_all + 1100)  # S, T, N of the batches not stepped on
            obj, loss, s_glob, stop = local_objective(comm, dmodel, db, eps, -5.0, others=others)
            assert stop is False
            obj.backward()
            grads = [p.grad for p in model.parameters()]
            ref_loss, ref_grads, (s, n, t) = _reference_grad(ref_set.batches[b], cell, eps, others)
            assert np.isclose(loss, ref_loss, rtol=1e-10)
            assert np.isclose(s_glob, s, rtol=1e-12)
            assert dist.batches[b].n_all == n and np.isclose(dist.batches[b].true_sum, t, rtol=1e-12)
            for g, r in zip(grads, ref_grads):
                assert torch.allclose(g, r, rtol=1e-9, atol=1e-12 * float(r.abs().max()))
            assert any(float(g.abs().max()) > 0 for g in grads)
            del dmodel, obj  # free the DDP wrapper while the process group lives
        gc.collect()
    assert dist.n_particles == NPART  # every particle's cell is in one batch


def test_true_field_meets_the_constraint():
    """A model field equal to the true field (every particle selected, f = f_true) has S = T in every
    batch: the target is one the truth meets."""
    rng = np.random.default_rng(3)
    cell = rng.integers(0, NG**3, NPART)
    pid = rng.permutation(NPART).astype(np.uint64)
    f_true = np.exp(rng.standard_normal(NPART))
    f_true /= f_true.mean()
    dens = np.bincount(cell, weights=f_true, minlength=NG**3) * NG**3 / NPART - 1.0
    theta = rng.standard_normal((NPART, 3))
    bs = build_batches(MPI.COMM_SELF, theta, cell, pid, lambda c: dens[c], NG**3, NPART, frac=1.0, batch_size=500,
                       seed=3, member=0, dtype=torch.float64)
    assert len(bs) > 1
    for batch in bs.batches:
        s = float((batch.weight * torch.zeros_like(batch.scale).index_add_(
            0, batch.idx, torch.as_tensor(f_true[batch.pidx]))).sum())
        assert np.isclose(s, batch.true_sum, rtol=1e-12)


@pytest.mark.mpi
@pytest.mark.parametrize("grid_loss", ["mse", "poisson"])
def test_projected_gradient_equals_one_rank_whole_batch(comm, grid_loss):
    """``constraint: projection``: the DDP gradient of the grid term of f scaled to the batch's true
    sum equals plain autograd through the scale on one rank (empty ranks included), and the term is
    blind to the normalisation of f (the output bias gets no gradient from it); for both grid terms."""
    theta, cell, pid = _all_particles()
    mine = plane_owner(cell // NG**2, NG, comm.size) == comm.rank
    target = _target if grid_loss == "mse" else _target_halos
    dist = _batches(comm, theta[mine], cell[mine], pid[mine], target)
    ref_set = _batches(MPI.COMM_SELF, theta, cell, pid, target)
    with ddp.process_group(comm):
        for b in range(len(dist)):
            model = _model()
            with torch.no_grad():
                model.net[-1].bias.fill_(0.3)  # no guard term: the bias direction is the normalisation alone
            dmodel = ddp.wrap(model, comm)
            obj, loss, _, _ = local_objective(comm, dmodel, dist.batches[b], None, -5.0, constraint="projection",
                                              grid_loss=grid_loss)
            obj.backward()
            grads = [p.grad for p in model.parameters()]
            ref = _model()
            with torch.no_grad():
                ref.net[-1].bias.fill_(0.3)
            ref_loss, ref_grads = _reference_projected_with(ref, ref_set.batches[b], cell, grid_loss=grid_loss)
            assert np.isclose(loss, ref_loss, rtol=1e-10)
            scale = max(float(r.abs().max()) for r in ref_grads)
            for g, r in zip(grads, ref_grads):
                assert torch.allclose(g, r, rtol=1e-8, atol=1e-10 * scale)
            bias_grad = float(model.net[-1].bias.grad.abs().max())
            assert bias_grad < 1e-9 * max(float(g.abs().max()) for g in grads)
            del dmodel, obj
        gc.collect()


def _reference_projected_with(model, batch, cell, guard_y=-5.0, grid_loss="mse"):
    """Plain autograd on one rank of the projected grid term of ``model``: f scaled by c = T / S (S from
    numpy weights, T the true field's batch sum), the gradient through c included; ``poisson``: the
    deviance 2 sum_j (t ln(t/m) - t + m), t ln t = 0 at t = 0."""
    y = model(batch.x)
    f = f_of_y(y)
    cellsum = torch.zeros_like(batch.scale).index_add_(0, batch.idx, f)
    w = _numpy_weights(batch, cell)
    _, _, t = _direct_constraint(batch, cell, f.detach().numpy(), _target if grid_loss == "mse" else _target_halos)
    c = t / (w * f).sum()
    m, tt = batch.scale * cellsum * c, 1 + batch.target
    if grid_loss == "mse":
        grid = ((m - tt) ** 2).sum()
    else:
        assert float(tt.min()) == 0.0 and float(tt.min()) >= 0  # empty cells are in the test
        tlog = torch.where(tt > 0, tt * torch.log(torch.where(tt > 0, tt, 1.0) / m), torch.zeros_like(tt))
        grid = 2 * (tlog - tt + m).sum()
    loss = grid + (torch.clamp(y - guard_y, max=0) ** 4).sum()
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.mpi
@pytest.mark.parametrize("grid_loss", ["mse", "poisson"])
def test_projection_on_a_batch_without_true_mass_is_zero(comm, grid_loss):
    """A batch whose cells hold no halo (t = 0 everywhere: sparse targets such as thin mass ranges)
    has a zero projected grid term with a zero, finite gradient on every rank; the formulas' 0/0
    made the loss nan and stopped training as diverged."""
    theta, cell, pid = _all_particles()
    mine = plane_owner(cell // NG**2, NG, comm.size) == comm.rank
    empty = lambda c: np.full(np.shape(c), -1.0)  # noqa: E731  delta_true = -1: no halo anywhere
    dist = _batches(comm, theta[mine], cell[mine], pid[mine], empty)
    with ddp.process_group(comm):
        model = _model()
        dmodel = ddp.wrap(model, comm)
        for batch in dist.batches:
            assert batch.true_sum == 0.0
            model.zero_grad()
            obj, loss, s, _ = local_objective(comm, dmodel, batch, None, -5.0, constraint="projection",
                                              grid_loss=grid_loss)
            obj.backward()
            assert np.isfinite(s) and s > 0 and np.isfinite(loss)
            with torch.no_grad():  # the grid term itself is 0, not only finite: loss = guard term
                _, guard, s_local = batch_terms(model, batch, -5.0, grid_loss)
                cellsum = cell_sums(batch, f_of_y(model(batch.x)))
                grid, through_c = projected_grid(comm, batch, cellsum, s_local, grid_loss)
            assert float(grid) == 0.0 and float(through_c) == 0.0
            assert loss == pytest.approx(comm.allreduce(float(guard)), rel=1e-12, abs=0.0)
            for p in model.parameters():
                assert torch.isfinite(p.grad).all()
        del dmodel, obj
        gc.collect()
