"""Gradient clipping relative to the recent gradient norms (``train.clip_grad``).

Why (measured on planted truths, docs/results.md): with f = 10^y and a grid term summed over the
cells of a batch, a few batches whose cells hold a spike of the true field give gradients 10-100x
the median norm. Adam's first moment then carries one such direction for ~10 steps at full step
size, which drove y of some particles 6-10 decades above the truth in the first epoch (a batch's
sum of f reached 1e11 x its truth's on the spiky corner b = (2, 0.2, -1)). Clipping the norm at a
few times the running median of the recent norms caps it at ~1e3 and does not change the
objective's minimum: only the size of the rare outlying steps. The median is of the unclipped norms
of the last ``window`` steps, so the limit follows the loss's own scale (no unit to set) as it falls.

The gradients are those after DDP's all-reduce, identical on every rank, so every rank clips alike;
the history is part of the checkpoint, so that resume is exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

MIN_HISTORY = 5  # no clipping before this many steps (or the window) have set the scale


@dataclass
class GradClip:
    """Clip the gradient's global norm at ``factor`` x the median norm of the last ``window`` steps
    (``factor`` 0: off, the paper). ``norms``: the recent unclipped norms (checkpointed)."""

    factor: float = 0.0
    window: int = 50
    norms: list = field(default_factory=list)

    def __call__(self, params) -> float:
        """Clip the gradients of ``params`` in place; returns the factor they were multiplied by (1: none)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 1.0
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().double())
                                                            for g in grads])))
        scale = 1.0
        if self.factor > 0 and len(self.norms) >= min(MIN_HISTORY, self.window) and np.isfinite(norm):
            limit = self.factor * float(np.median(self.norms))
            if norm > limit > 0:
                scale = limit / norm
                for g in grads:
                    g.mul_(scale)
        if np.isfinite(norm):
            self.norms = (self.norms + [norm])[-self.window:]
        return scale
