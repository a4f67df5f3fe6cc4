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


def _rendezvous_store(comm, timeout: timedelta):
    """The TCPStore of the rendezvous, race-free: rank 0 starts the store server on port 0 (the
    kernel picks a free port and the server keeps it bound), then broadcasts the port it got; the
    other ranks connect to it. Collective."""
    hosts = comm.allgather(socket.gethostname())
    store, rendezvous = None, None
    if comm.rank == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.gethostname())
        try:
            store = dist.TCPStore(addr, 0, comm.size, is_master=True, timeout=timeout, wait_for_workers=False)
            rendezvous = (addr, store.port)
        except Exception as exc:  # noqa: BLE001 - tell the other ranks, then raise everywhere
            rendezvous = f"rank 0 could not start the torch.distributed store on {addr}: {exc}"
    rendezvous = comm.bcast(rendezvous, root=0)
    if isinstance(rendezvous, str):
        raise RuntimeError(rendezvous)
    addr, port = rendezvous
    if comm.rank != 0:
        store = dist.TCPStore(addr, port, comm.size, is_master=False, timeout=timeout)
    return store, addr, port


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def configure_torch(threads: int | None = None) -> None:
    """Process-wide torch settings of a training or prediction rank: ``threads`` intra-op threads
    (default: 1 when several MPI ranks share the node, else torch's own choice) and, on the CPU,
    no oneDNN (``torch.backends.mkldnn``).

    Why no oneDNN: our batches are whole cells, so nearly every step has a new row count, and
    oneDNN keeps a compiled primitive per shape (up to 1024, ~14 kB each) in the C heap: ~30 MB per
    rank that stays after training and appeared as 14 B per particle in the validation box's
    routing at 2 ranks (issue #11; measured with glibc ``mallinfo2``: heap in use +10.5 MB from ppd 64
    to 128, none with oneDNN off). Torch's own CPU kernels are also faster on such shapes (steps of
    3000-30000 rows of the default MLP: 11-30% faster here; the default run trains 11% more
    particles per second). GPUs are unaffected."""
    from mpi4py import MPI

    torch.set_num_threads(threads or (1 if MPI.COMM_WORLD.Get_size() > 1 else torch.get_num_threads()))
    if not torch.cuda.is_available():
        torch.backends.mkldnn.enabled = False


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
    timeout = timedelta(seconds=timeout_s)
    store, addr, port = _rendezvous_store(comm, timeout)
    dist.init_process_group(backend, store=store, rank=comm.rank, world_size=comm.size, timeout=timeout)
    log.info(f"torch.distributed initialised: backend {backend}, {comm.size} ranks, {addr}:{port}")
    try:
        yield dist.group.WORLD
    except BaseException:
        gc.collect()
        dist.destroy_process_group()  # no collective here: the other ranks may be anywhere
        raise
    gc.collect()  # DDP wrappers still alive past destroy_process_group can deadlock when freed
    dist.destroy_process_group()
    comm.Barrier()  # rank 0's store server outlives every client
    del store


def wrap(model: torch.nn.Module, comm):
    """DistributedDataParallel around ``model`` when running on several ranks."""
    if comm.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
