"""Logging with elapsed wall time and rank in every line; rank 0 speaks unless asked otherwise."""
from __future__ import annotations

import logging
import sys
import time

LOGGER_NAME = "lagbias_mpi"


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int, size: int, t0: float):
        super().__init__()
        self.rank, self.size, self.t0 = rank, size, t0

    def format(self, record: logging.LogRecord) -> str:
        elapsed = record.created - self.t0
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f"[{elapsed:9.2f}s r{self.rank}/{self.size}] {record.levelname[0]} {msg}"


def setup_logging(comm, level: str | int = "INFO", all_ranks: bool = False,
                  t0: float | None = None) -> logging.Logger:
    """Configure the package logger: rank 0 logs at ``level``; other ranks only warnings unless
    ``all_ranks``. Elapsed times count from ``t0`` (a ``time.time()``; default: the first set-up of
    this process). Returns the logger."""
    logger = logging.getLogger(LOGGER_NAME)
    if t0 is None:
        t0 = getattr(logger, "lagbias_t0", None) or time.time()
    logger.lagbias_t0 = t0
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(comm.rank, comm.size, t0))
    logger.addHandler(handler)
    logger.propagate = False
    if isinstance(level, str):
        level = getattr(logging, level.upper())
    logger.setLevel(level if (comm.rank == 0 or all_ranks) else max(level, logging.WARNING))
    return logger


def rank_formatter(comm) -> logging.Formatter:
    """A formatter like the console's (rank, elapsed time since the logging set-up), e.g. for a log file."""
    t0 = getattr(logging.getLogger(LOGGER_NAME), "lagbias_t0", None) or time.time()
    return _RankFormatter(comm.rank, comm.size, t0)


def get_logger(name: str = "") -> logging.Logger:
    """Child logger of the package logger."""
    return logging.getLogger(LOGGER_NAME + ("." + name if name else ""))


class Progress:
    """Rank-0 progress reporter for long loops: logs at most every ``every_s`` seconds.

    Usage: ``prog = Progress(comm, total, "PM steps"); prog.update(i + 1)``.
    """

    def __init__(self, comm, total: int, what: str, every_s: float = 5.0, logger=None):
        self.comm, self.total, self.what, self.every_s = comm, max(int(total), 1), what, every_s
        self.logger = logger or get_logger()
        self.t0 = self.t_last = time.time()

    def update(self, done: int, extra: str = "") -> None:
        now = time.time()
        if self.comm.rank != 0:
            return
        if done >= self.total or now - self.t_last >= self.every_s:
            frac = done / self.total
            width = 24
            bar = "#" * int(round(frac * width)) + "." * (width - int(round(frac * width)))
            eta = (now - self.t0) / max(frac, 1e-9) * (1 - frac)
            self.logger.info(f"{self.what} [{bar}] {done}/{self.total} eta {eta:.0f}s {extra}".rstrip())
            self.t_last = now
