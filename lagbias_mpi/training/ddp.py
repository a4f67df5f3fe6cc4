"""torch.distributed from the MPI world: rank and size from mpi4py, rendezvous from rank 0.

``process_group(comm)`` initialises the default process group over the ranks of ``comm`` (gloo on
CPU, nccl when CUDA is present) and destroys it on exit. With one rank nothing is initialised and
``wrap`` returns the plain model: a one-process DDP is the identity.

Free every DDP wrapper (``del`` + ``gc.collect()``) before leaving ``process_group``: a wrapper
freed after ``destroy_process_group`` destroys the gloo group from Python and can deadlock on the GIL.
"""
from __future__ import annotations

import contextlib
import gc
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from lagbias_mpi.core.logs import get_logger

log = get_logger("ddp")


log = get_logger("ddp")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(comm) -> torch.device:
    """The torch device of this rank: its local GPU if CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", comm.rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(comm, backend: str | None = None, timeout_s: float = 600.0):
    """Initialise torch.distributed over ``comm`` for the duration of the block (collective)."""
    if comm.size == 1:
        yield None
        return
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised")
    backend = backend or default_backend()
    hosts = comm.allgather(socket.gethostname())
    if comm.rank == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.gethostname())
        rendezvous = (addr, _free_port())
    else:
        rendezvous = None
    addr, port = comm.bcast(rendezvous, root=0)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=comm.rank,
                            world_size=comm.size, timeout=timedelta(seconds=timeout_s))
    log.info(f"torch.distributed initialised: backend {backend}, {comm.size} ranks, {addr}:{port}")
    try:
        yield dist.group.WORLD
    finally:
        gc.collect()  # DDP wrappers still alive past destroy_process_group can deadlock when freed
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, comm):
    """DistributedDataParallel around ``model`` when running on several ranks."""
    if comm.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
