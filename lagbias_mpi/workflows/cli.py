"""What every command shares: input errors reported plainly, any other failure ends the job; the
``--config``/``--set`` arguments; the summary.json every command writes."""
from __future__ import annotations

import sys
from typing import Callable

from mpi4py import MPI

from lagbias_mpi.config.loader import ConfigError, to_dict
from lagbias_mpi.core.atomic import write_json
from lagbias_mpi.core.memory import tune_malloc
from lagbias_mpi.io.simfile import SimulationFileError
from lagbias_mpi.mpi.comm import abort_on_exception, peak_rss_mb
from lagbias_mpi.mpi.environment import environment_info


def run_command(comm, body: Callable[[], object]) -> int:
    """Run a command body collectively and return its exit code.

    A bad config or a missing/malformed input file on a single rank prints ``error: <message>`` and
    returns 2 (no traceback); on several ranks, and for any other exception, the whole job ends with
    MPI Abort and the message (never a hang).
    """

    tune_malloc()  # large temporaries are unmapped when freed (lagbias_mpi.core.memory)

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


def add_set_argument(parser, help_text: str = "override a config key by its dotted name (repeatable)") -> None:
    """``--set KEY=VALUE`` (repeatable), parsed later by :func:`lagbias_mpi.config.apply_overrides`."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def add_config_arguments(parser, config_help: str) -> None:
    """The required ``--config FILE.yaml`` and ``--set KEY=VALUE`` of a command driven by a config."""
    parser.add_argument("--config", required=True, help=config_help)
    add_set_argument(parser)


def write_summary(comm, path, summary: dict, timer=None, cfg=None) -> dict:
    """Complete a command's ``summary`` with what every summary holds (per-stage wall times of
    ``timer``, peak RSS over ranks, environment, the resolved ``cfg``; keys already set are kept),
    write it atomically on rank 0 and wait, so that it exists on return on every rank (collective)."""
    if timer is not None:
        summary.setdefault("stage_wall_s", timer.summary())
    summary.setdefault("peak_rss_mb", comm.allreduce(peak_rss_mb(), op=MPI.MAX))
    summary.setdefault("environment", environment_info(comm))
    if cfg is not None:
        summary.setdefault("config", to_dict(cfg))
    if comm.rank == 0:
        write_json(path, summary)
    comm.Barrier()
    return summary
