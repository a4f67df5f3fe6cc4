"""The distributed step's gradient equals the gradient of the whole-batch loss on one rank."""
import gc

import numpy as np
import pytest
import torch
from mpi4py import MPI

from lagbias_mpi.bias.model import build_model, f_of_y
from lagbias_mpi.mpi.layout import plane_owner
from lagbias_mpi.training import ddp
from lagbias_mpi.training.batches import build_batches
from lagbias_mpi.training.loss import local_objective

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


def _batches(comm, theta, cell, pid):
    return build_batches(comm, theta, cell, pid, _target, NG**3, NPART, frac=0.5, batch_size=400, seed=3,
                         member=0, dtype=torch.float64)


def _model():
    model = build_model(SHAPE, seed=5, dtype=torch.float64)
    with torch.no_grad():
        model.net[-1].bias.fill_(-4.9)  # some y below -5: the guard term is active
    return model


def _reference_grad(batch, eps, guard_y=-5.0):
    """Plain autograd of the whole-batch loss on one rank."""
    model = _model()
    y = model(batch.x)
    f = f_of_y(y)
    cellsum = torch.zeros_like(batch.scale).index_add_(0, batch.idx, f)
    loss = ((batch.scale * cellsum - 1 - batch.target) ** 2).sum() + (torch.clamp(y - guard_y, max=0) ** 4).sum()
    loss = loss + (f.sum() / batch.n_global - 1) ** 2 / eps**2
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


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
            obj, loss, _, stop = local_objective(comm, dmodel, dist.batches[b], eps, -5.0)
            assert stop is False
            obj.backward()
            grads = [p.grad for p in model.parameters()]
            ref_loss, ref_grads = _reference_grad(ref_set.batches[b], eps)
            assert np.isclose(loss, ref_loss, rtol=1e-10)
            for g, r in zip(grads, ref_grads):
                assert torch.allclose(g, r, rtol=1e-9, atol=1e-12 * float(r.abs().max()))
            assert any(float(g.abs().max()) > 0 for g in grads)
            del dmodel, obj  # free the DDP wrapper while the process group lives
        gc.collect()
