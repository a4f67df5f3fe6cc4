"""Fault injection for tests of the failure paths: with ``LAGBIAS_FAIL_AT=<point>@<rank>`` in the
environment, :func:`fail_point` raises :class:`InjectedFailure` on that rank when the code reaches
``point`` (``ddp_step``: inside a training step, between the loss reduction and DDP's gradient
all-reduce; ``exchange``: inside a particle exchange, before its Alltoall). Unset: a no-op.
"""
from __future__ import annotations

import os

ENV = "LAGBIAS_FAIL_AT"
POINTS = ("ddp_step", "exchange")


class InjectedFailure(RuntimeError):
    """The failure asked for by ``LAGBIAS_FAIL_AT``."""


def fail_point(comm, point: str) -> None:
    """Raise on the rank that ``LAGBIAS_FAIL_AT`` names when it names ``point``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, rank = spec.partition("@")
    if where not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: the point must be one of {POINTS}")
    if where == point and str(comm.rank) == rank.strip():
        raise InjectedFailure(f"{ENV}={spec}: injected failure at {point} on rank {comm.rank}")
