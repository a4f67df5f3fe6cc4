"""StopControl: the signal handler only sets a flag; the budgets count epochs and steps."""
import os
import signal

import pytest

from lagbias_mpi.training.stopping import StopControl


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_flag_and_handlers_are_restored(signum):
    before = signal.getsignal(signum)
    stop = StopControl()
    with stop.handlers():
        assert not stop.after_this_step()
        os.kill(os.getpid(), signum)  # delivered to this (main) thread before kill returns
        assert stop.signalled == signum and stop.after_this_step()
        assert signal.Signals(signum).name in stop.reason()
    assert signal.getsignal(signum) is before


def test_budgets():
    stop = StopControl(epochs=2, steps=3)
    assert [stop.start_epoch() for _ in range(3)] == [False, False, True]
    assert [stop.after_this_step() for _ in range(3)] == [False, False, True]
    free = StopControl()
    assert not any(free.start_epoch() or free.after_this_step() for _ in range(100))
    assert "budget" in stop.reason()
