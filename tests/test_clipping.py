"""Gradient clipping relative to the recent norms (training.clipping.GradClip)."""
import numpy as np
import pytest
import torch

from lagbias_mpi.training.clipping import MIN_HISTORY, GradClip


def _params(norm: float):
    """Two parameters whose gradients have global norm ``norm`` (3-4-5 triangle)."""
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([0.6 * norm]), torch.tensor([0.8 * norm])
    return [a, b]


def test_clips_outliers_at_factor_times_the_median_of_recent_norms():
    clip = GradClip(factor=2.0, window=4)
    for n in (1.0, 3.0, 2.0, 2.0):  # until the window (or MIN_HISTORY steps) has set the scale: none
        assert clip(_params(n)) == 1.0
    assert MIN_HISTORY >= 4
    assert clip(_params(100.0)) == pytest.approx(0.04)  # 2 x median(1, 3, 2, 2) = 4
    assert clip.norms == pytest.approx([3.0, 2.0, 2.0, 100.0])  # window 4: the first dropped, unclipped kept
    ps = _params(50.0)
    scale = clip(ps)  # median of the last 4 norms (3, 2, 2, 100) = 2.5: the limit is 5
    assert scale == pytest.approx(0.1)
    assert float(torch.sqrt(ps[0].grad ** 2 + ps[1].grad ** 2)) == pytest.approx(5.0)
    assert clip.norms[-1] == pytest.approx(50.0)  # the history keeps the unclipped norm
    small = _params(1.0)
    assert clip(small) == 1.0 and float(small[1].grad) == pytest.approx(0.8)


def test_off_and_non_finite():
    off = GradClip(factor=0.0)
    for n in (1.0,) * 10:
        off(_params(n))
    ps = _params(1e6)
    assert off(ps) == 1.0 and float(ps[0].grad) == pytest.approx(6e5)
    clip = GradClip(factor=2.0)
    for n in (1.0,) * 6:
        clip(_params(n))
    assert clip(_params(float("nan"))) == 1.0 and all(np.isfinite(clip.norms))
    assert GradClip(factor=2.0)([torch.zeros(1, requires_grad=True)]) == 1.0  # no gradient at all
