"""Particle exchange: send per-particle columns to destination ranks with one packed Alltoallv.

The columns are packed into one structured array, sent with a contiguous datatype of one particle's
size (so that byte counts above 2**31 still work, as pmesh's ``Layout.exchange`` does), and unpacked
into preallocated result columns, in rounds of bounded size (``EXCHANGE_CHUNK_BYTES``). Send counts
go first with one Alltoall. The global particle count is checked to be unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from lagbias_mpi.core.faults import fail_point
from lagbias_mpi.mpi.cells import range_overlaps
from lagbias_mpi.mpi.comm import check_count


@dataclass
class ExchangeStats:
    """What one exchange moved on this rank."""

    n_sent: int
    n_received: int
    bytes_sent: int
    bytes_received: int
    n_global: int


def pack_columns(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Pack equal-length columns (any shape ``(n, ...)``) into one structured array."""
    if not columns:
        raise ValueError("exchange needs at least one column")
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    dtype = np.dtype([(name, col.dtype, col.shape[1:]) for name, col in columns.items()])
    packed = np.empty(next(iter(lengths.values())), dtype=dtype)
    for name, col in columns.items():
        packed[name] = col
    return packed


def unpack_columns(packed: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_columns`: contiguous copies of every field."""
    return {name: np.ascontiguousarray(packed[name]) for name in packed.dtype.names}


EXCHANGE_CHUNK_BYTES = 1 << 27  # bytes of records each rank sends per round (128 MiB)


def exchange(comm, columns: dict[str, np.ndarray], dest: np.ndarray, what: str = "particles",
             return_stats: bool = False, chunk_bytes: int = EXCHANGE_CHUNK_BYTES):
    """Send row ``i`` of every column to rank ``dest[i]``; return the received columns.

    Rows arrive grouped by source rank, in their original order within each source, so the result
    is deterministic (and independent of ``chunk_bytes``). Works with zero rows on any rank.
    Collective over ``comm``. The rows go in rounds of at most ``chunk_bytes`` per rank into
    preallocated result columns: beyond the input and the result, the exchange holds O(chunk) bytes.
    """
    dest = np.asarray(dest)
    if not columns:
        raise ValueError("exchange needs at least one column")
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    n = next(iter(lengths.values()))
    if len(dest) != n:
        raise ValueError(f"dest has {len(dest)} entries for {n} rows")
    if n and dest.dtype.kind not in "iu":
        raise ValueError(f"destination ranks must be integers, got dtype {dest.dtype}")
    if n and (dest.min() < 0 or dest.max() >= comm.size):
        raise ValueError(f"destination ranks outside [0, {comm.size}): {dest.min()}..{dest.max()}")
    dtype = np.dtype([(name, col.dtype, col.shape[1:]) for name, col in columns.items()])
    itemsize = dtype.itemsize
    fail_point(comm, "exchange")  # tests: one rank fails while the others wait in the Alltoall
    if comm.size == 1:
        out = {name: np.ascontiguousarray(col) for name, col in columns.items()}
        n_global = check_count(comm, n, n, what)
        stats = ExchangeStats(n, n, int(n * itemsize), int(n * itemsize), n_global)
        return (out, stats) if return_stats else out
    send_total = np.bincount(dest, minlength=comm.size).astype(np.int64) if n else np.zeros(comm.size, np.int64)
    recv_total = np.empty(comm.size, dtype=np.int64)
    comm.Alltoall(send_total, recv_total)
    n_recv = int(recv_total.sum())
    out = {name: np.empty((n_recv,) + col.shape[1:], col.dtype) for name, col in columns.items()}
    filled = np.concatenate([[0], np.cumsum(recv_total)[:-1]])  # next free row of each source
    chunk_rows = max(1, int(chunk_bytes) // max(itemsize, 1))
    n_rounds = comm.allreduce(-(-n // chunk_rows), op=MPI.MAX)
    rowtype = MPI.BYTE.Create_contiguous(itemsize).Commit()
    try:
        for r in range(max(n_rounds, 1)):
            lo, hi = min(r * chunk_rows, n), min((r + 1) * chunk_rows, n)
            d = dest[lo:hi]
            order = np.argsort(d, kind="stable")
            packed = np.empty(hi - lo, dtype=dtype)
            for name, col in columns.items():
                packed[name] = col[lo:hi][order]
            del order
            sc = np.bincount(d, minlength=comm.size).astype(np.int64)
            rc = np.empty(comm.size, dtype=np.int64)
            comm.Alltoall(sc, rc)
            if max(int(sc.sum()), int(rc.sum())) >= 2**31:
                raise OverflowError("more than 2**31 particles through one rank in one exchange round")
            recvbuf = np.empty(int(rc.sum()), dtype=dtype)
            sd = np.concatenate([[0], np.cumsum(sc)[:-1]])
            rd = np.concatenate([[0], np.cumsum(rc)[:-1]])
            comm.Alltoallv([packed.view(np.uint8), (sc.astype(np.int32), sd.astype(np.int32)), rowtype],
                           [recvbuf.view(np.uint8), (rc.astype(np.int32), rd.astype(np.int32)), rowtype])
            del packed
            # rows from source s go to out[filled[s] : filled[s] + rc[s]]
            target = np.repeat(filled - rd, rc) + np.arange(len(recvbuf), dtype=np.int64)
            for name in out:
                out[name][target] = recvbuf[name]
            filled += rc
            del recvbuf, target
    finally:
        rowtype.Free()
    n_global = check_count(comm, n, n_recv, what)
    if return_stats:
        return out, ExchangeStats(n, n_recv, int(n * itemsize), int(n_recv * itemsize), n_global)
    return out


def redistribute_ranges(comm, values: np.ndarray, src_edges: np.ndarray, dst_edges: np.ndarray) -> np.ndarray:
    """Move a 1-d array distributed as contiguous pieces ``[src_edges[r], src_edges[r+1])`` (this
    rank's piece is ``values``) to pieces ``[dst_edges[r], dst_edges[r+1])``; returns this rank's new
    piece (same dtype). Collective; used to bring grid values from plane slabs to cell owners and back."""
    values = np.ascontiguousarray(values).reshape(-1)
    sc, sd, rc, rd = range_overlaps(src_edges, dst_edges, comm.rank)
    if len(values) != int(src_edges[comm.rank + 1] - src_edges[comm.rank]):
        raise ValueError(f"rank {comm.rank} holds {len(values)} values for the range "
                         f"[{src_edges[comm.rank]}, {src_edges[comm.rank + 1]})")
    out = np.empty(int(rc.sum()), dtype=values.dtype)
    if comm.size == 1:
        out[:] = values
        return out
    if max(int(sc.sum()), int(rc.sum())) >= 2**31:
        raise OverflowError("more than 2**31 grid values through one rank in one redistribution")
    rowtype = MPI.BYTE.Create_contiguous(values.dtype.itemsize).Commit()
    try:
        comm.Alltoallv([values.view(np.uint8), (sc.astype(np.int32), sd.astype(np.int32)), rowtype],
                       [out.view(np.uint8), (rc.astype(np.int32), rd.astype(np.int32)), rowtype])
    finally:
        rowtype.Free()
    return out
