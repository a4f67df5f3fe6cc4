"""The learning-rate warm-up (``train.warmup_steps``)."""
import pytest

from lagbias_mpi.config.train import TrainConfig
from lagbias_mpi.training.loop import warmup_factor


def test_warmup_is_linear_then_flat():
    assert [warmup_factor(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_config_checks():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)
    assert TrainConfig().warmup_steps == 0  # the paper
