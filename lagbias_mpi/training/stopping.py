"""Stopping training early and cleanly: on SIGTERM/SIGUSR1 (a batch system about to kill or requeue
the job) or after a test budget of epochs or steps (``--stop-after-epochs``/``--stop-after-steps``).

The signal handler only sets a flag. The training loop reduces the flag over the ranks together with
the loss terms it reduces anyway (no extra message), finishes the step under way on every rank,
writes a mid-epoch checkpoint and stops; ``--resume`` continues from the next step with the same
batches, so that the result equals the uninterrupted run's (docs/train.md).
"""
from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    """Training stopped early (a signal or a test budget); the checkpoints allow ``--resume``."""


class StopControl:
    """Why this process should stop: ``signalled`` by a handler, or a budget of ``epochs`` / ``steps``
    (optimiser steps over the whole run, counted in this process) that has run out."""

    def __init__(self, epochs: int | None = None, steps: int | None = None):
        self.epochs_left = epochs
        self.steps_left = steps
        self.signalled: int | None = None

    def handle(self, signum, frame) -> None:
        """Signal handler: remember the signal; the training loop acts on it after the current step."""
        self.signalled = signum

    @contextlib.contextmanager
    def handlers(self):
        """Install :meth:`handle` for SIGTERM and SIGUSR1 while training (main thread only; the
        previous handlers are restored afterwards)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def start_epoch(self) -> bool:
        """True when the epoch budget has run out (checked before an epoch starts; same on every rank)."""
        if self.epochs_left is None:
            return False
        if self.epochs_left <= 0:
            return True
        self.epochs_left -= 1
        return False

    def before_next_epoch(self) -> None:
        """Make the next :meth:`start_epoch` stop (a stop wish on the last step of an epoch)."""
        self.epochs_left = 0

    def after_this_step(self) -> bool:
        """Whether this rank wants to stop once the current step is done (a signal arrived, or this
        is the last step of the budget). Reduced over the ranks by the caller."""
        if self.steps_left is not None:
            self.steps_left -= 1
            if self.steps_left <= 0:
                return True
        return self.signalled is not None

    def reason(self) -> str:
        if self.signalled is not None:
            return f"signal {signal.Signals(self.signalled).name}"
        return "the test budget (--stop-after-epochs/--stop-after-steps)"
