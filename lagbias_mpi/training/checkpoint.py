"""Per-member training checkpoints: written atomically by rank 0, read by rank 0 and broadcast.

A checkpoint (``checkpoints/member_<m>.pt``) holds the model, optimiser, scheduler and torch RNG
state, the history so far, the integral-constraint batch sums, the epoch it ends and the hash of the
configuration that wrote it; :func:`lagbias_mpi.training.loop.train_member` resumes from it.

Surviving faults: a checkpoint appears by rename only (a kill while it is written leaves the old one
whole), and the one it replaces is kept as ``member_<m>.prev.pt`` (a hard link made before the rename). A checkpoint that cannot be read
(truncated, corrupt, not a checkpoint) is refused with a message naming the file on every rank, and
the previous one is used if it is good; if neither is, every rank raises :class:`CheckpointError`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from lagbias_mpi.core.atomic import atomic_path
from lagbias_mpi.core.logs import get_logger

log = get_logger("checkpoint")

REQUIRED_KEYS = ("member", "epoch", "done", "model", "optimizer", "scheduler", "history", "torch_rng",
                 "config_hash")


class CheckpointError(RuntimeError):
    """No usable checkpoint although one exists (damaged, and no good previous one)."""


def checkpoint_path(ckpt_dir: Path, member: int) -> Path:
    """Checkpoint file of ensemble member ``member`` in ``ckpt_dir``."""
    return ckpt_dir / f"member_{member}.pt"


def previous_path(path) -> Path:
    """Where the checkpoint replaced by the latest one of ``path`` is kept."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(comm, path, payload: dict) -> None:
    """Rank 0 writes ``payload`` atomically (write, rename), keeping the checkpoint it replaces as
    :func:`previous_path` (a hard link, so that ``path`` never disappears); everybody waits. A kill
    at any moment leaves whole checkpoints at ``path`` and the previous path."""
    if comm.rank == 0:
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
            if path.is_file():  # keep the current one as the previous, without ever removing it
                prev = previous_path(path)
                link = prev.with_name(f".{prev.name}.link")
                link.unlink(missing_ok=True)
                try:
                    os.link(path, link)
                except OSError:
                    shutil.copy2(path, link)
                os.replace(link, prev)
    comm.Barrier()


def _read(path: Path) -> dict:
    """A checkpoint read and checked (rank 0); raises with the reason when it is not usable."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict):
        raise ValueError(f"not a checkpoint (a {type(payload).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"not a checkpoint: missing {', '.join(missing)}")
    return payload


def load_checkpoint(comm, path) -> dict | None:
    """Rank 0 reads a checkpoint (None if there is none) and broadcasts it; a damaged one is
    refused (a warning naming it on every rank) and the previous good one used (collective)."""
    path = Path(path)
    payload, notes, error = None, [], None
    if comm.rank == 0:
        candidates = [p for p in (path, previous_path(path)) if p.is_file()]
        for p in candidates:
            try:
                payload = _read(p)
                break
            except Exception as exc:  # noqa: BLE001 - any failure to read means: damaged
                notes.append(f"checkpoint {p} is damaged and refused ({type(exc).__name__}: {exc})")
        if payload is not None and notes:
            notes.append(f"using the previous good checkpoint {previous_path(path)} "
                         f"(member {payload['member']}, epoch {payload['epoch']})")
        elif payload is None and notes:
            error = "; ".join(notes) + "; no good checkpoint left: remove them to start this member again"
    payload, notes, error = comm.bcast((payload, notes, error), root=0)
    for note in notes:
        log.warning(f"[rank {comm.rank}] {note}")
    if error is not None:
        raise CheckpointError(error)
    return payload
