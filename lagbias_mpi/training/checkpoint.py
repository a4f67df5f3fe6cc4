"""Per-member training checkpoints: written atomically by rank 0, read by rank 0 and broadcast.

A checkpoint (``checkpoints/member_<m>.pt``) holds the model, optimiser, scheduler and torch RNG
state, the history so far, the integral-constraint batch sums, the epoch it ends and the hash of the
configuration that wrote it; :func:`lagbias_mpi.training.loop.train_member` resumes from it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lagbias_mpi.core.atomic import atomic_path


def checkpoint_path(ckpt_dir: Path, member: int) -> Path:
    """Checkpoint file of ensemble member ``member`` in ``ckpt_dir``."""
    return ckpt_dir / f"member_{member}.pt"


def save_checkpoint(comm, path, payload: dict) -> None:
    """Rank 0 writes ``payload`` atomically (write, rename); everybody waits."""
    if comm.rank == 0:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    comm.Barrier()


def load_checkpoint(comm, path) -> dict | None:
    """Rank 0 reads a checkpoint (None if absent) and broadcasts it."""
    payload = None
    if comm.rank == 0 and path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=False)
    return comm.bcast(payload, root=0)
