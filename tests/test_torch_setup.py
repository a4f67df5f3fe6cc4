"""Process-wide torch settings of a training rank (training.ddp.configure_torch)."""
import gc

import numpy as np
import pytest
import torch
from mpi4py import MPI

from lagbias_mpi.bias.model import build_model
from lagbias_mpi.core.memory import heap_in_use_bytes, release_heap
from lagbias_mpi.training.ddp import configure_torch


@pytest.fixture
def restore_torch():
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    yield
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = onednn


def _steps_of_distinct_shapes(n_shapes: int) -> float:
    """Heap bytes still in use after training steps of ``n_shapes`` different row counts."""
    model = build_model({"n_in": 7, "width": 32, "depth": 2, "activation": "gelu"}, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)

    def step(rows):
        x = torch.as_tensor(rng.standard_normal((rows, 7)), dtype=torch.float32)
        loss = model(x).exp().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(500)
    gc.collect()
    release_heap()
    before = heap_in_use_bytes()
    for i in range(n_shapes):
        step(500 + i)
    gc.collect()
    release_heap()
    return heap_in_use_bytes() - before


@pytest.mark.skipif(heap_in_use_bytes() is None, reason="needs glibc mallinfo2")
def test_no_per_shape_cache_in_the_heap(restore_torch):
    """Batches of whole cells have a new row count at nearly every step: nothing may keep memory
    per shape (oneDNN's primitive cache held ~14 kB per shape, ~30 MB per rank; issue #11)."""
    configure_torch()
    assert not torch.backends.mkldnn.enabled or torch.cuda.is_available()
    kept = _steps_of_distinct_shapes(400)
    assert kept < 1.5e6, f"{kept / 1e6:.1f} MB kept in the C heap after 400 batch shapes"


@pytest.mark.mpi
def test_one_thread_per_rank_under_mpi(restore_torch):
    torch.set_num_threads(2)
    configure_torch()
    expected = 1 if MPI.COMM_WORLD.size > 1 else 2
    assert torch.get_num_threads() == expected
    configure_torch(threads=3)
    assert torch.get_num_threads() == 3
