"""What every command's ``main`` shares: input errors reported plainly, any other failure ends the job."""
from __future__ import annotations

import sys
from typing import Callable

from .config import ConfigError
from .parallel import abort_on_exception
from .simdata import SimulationFileError


def run_command(comm, body: Callable[[], object]) -> int:
    """Run a command body collectively and return its exit code.

    A bad config or a missing/malformed input file on a single rank prints ``error: <message>`` and
    returns 2 (no traceback); on several ranks, and for any other exception, the whole job ends with
    MPI Abort and the message (never a hang).
    """

    @abort_on_exception(comm)
    def guarded() -> int:
        try:
            body()
        except (ConfigError, SimulationFileError) as exc:
            if comm.size == 1:
                sys.stderr.write(f"error: {exc}\n")
                return 2
            raise
        return 0

    return guarded()
