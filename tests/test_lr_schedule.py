"""The learning-rate schedule: ``train.lr_decay`` per epoch, or ``train.lr_final`` (the last epoch's
lr over lr, whatever the number of epochs)."""
import numpy as np
import pytest
import torch
from mpi4py import MPI

from lagbias_mpi.config.train import TrainConfig
from lagbias_mpi.training.batches import build_batches
from lagbias_mpi.training.loop import train_member

PAPER_FINAL = 0.9**49  # the paper's 0.9 per epoch over 50 epochs


def test_epoch_decay_from_lr_final():
    assert TrainConfig().epoch_decay == 0.9  # the paper
    assert TrainConfig(epochs=50, lr_final=PAPER_FINAL).epoch_decay == pytest.approx(0.9, rel=1e-12)
    assert TrainConfig(epochs=20, lr_final=PAPER_FINAL).epoch_decay ** 19 == pytest.approx(PAPER_FINAL, rel=1e-12)
    assert TrainConfig(epochs=1, lr_final=0.01).epoch_decay == 1.0
    # lr_final replaces a config's lr_decay (``--set train.lr_final=...`` on a shipped config)
    assert TrainConfig(epochs=5, lr_decay=0.9, lr_final=0.0625).epoch_decay == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("bad", [{"lr_final": 0.0}, {"lr_final": 1.5}, {"lr_final": -0.1, "lr_decay": 0.8}])
def test_lr_final_checks(bad):
    with pytest.raises(ValueError, match="lr_final"):
        TrainConfig(**bad)


def test_training_ends_at_lr_final(tmp_path):
    """The lr of each epoch in the history: lr g^(epoch-1), ending at lr * lr_final."""
    rng = np.random.default_rng(4)
    n, ng = 2000, 5
    cell = np.sort(rng.integers(0, ng**3, n))
    pid = np.arange(n, dtype=np.uint64)
    theta = rng.standard_normal((n, 3)).astype(np.float32)
    batches = build_batches(MPI.COMM_SELF, theta, cell, pid, lambda c: np.zeros(len(c)), ng**3, n, frac=1.0,
                            batch_size=500, seed=1, member=0, dtype=torch.float32)
    tcfg = TrainConfig(epochs=4, ensemble=1, lr=0.01, lr_final=0.05, constraint="projection", grid_loss="poisson")
    res = train_member(MPI.COMM_SELF, 0, {"n_in": 3, "width": 8, "depth": 2, "activation": "gelu"}, batches, [],
                       tcfg, tmp_path, "h")
    lrs = np.array(res.history["lr"])
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.01 * 0.05, rel=1e-9)
    assert np.allclose(lrs[1:] / lrs[:-1], 0.05 ** (1 / 3), rtol=1e-9)
