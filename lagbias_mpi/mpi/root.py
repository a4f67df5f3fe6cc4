"""Run a check on rank 0 only and share its result, or its exception, with every rank.
"""
from __future__ import annotations

import pickle


class RootCheckError(ValueError):
    """A rank-0 check failed with an exception that cannot be sent as it is; the message names its type."""


def on_root(comm, fn, *args):
    """``fn(*args)`` run on rank 0 only, its result broadcast to every rank (collective).

    If it raises, every rank raises an exception of the same type with the same message (rank 0 the
    original one), so that the job ends cleanly instead of the other ranks waiting in the broadcast.
    An exception that cannot be sent as it is becomes a :class:`RootCheckError` naming its type,
    on every rank."""
    result, original, error = None, None, None
    if comm.rank == 0:
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 -- every failure must reach every rank
            original, error = exc, _portable(exc)
    result, sent = comm.bcast((result, error), root=0)
    if original is not None:  # rank 0: raise its own exception (with its traceback)
        if error is original:
            raise original
        raise error from original
    if sent is not None:
        raise sent
    return result


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling with its type and message, else a :class:`RootCheckError` naming it."""
    try:
        back = pickle.loads(pickle.dumps(exc))
        if type(back) is type(exc) and str(back) == str(exc):
            return exc
    except Exception:  # noqa: BLE001
        pass
    return RootCheckError(f"{type(exc).__name__}: {exc}")
