"""Particle exchange: send per-particle columns to destination ranks with one packed Alltoallv.

All columns are packed into one structured array, sent with a contiguous datatype of one particle's
size (so that byte counts above 2**31 still work, as pmesh's ``Layout.exchange`` does), and unpacked.
Send counts go first with one Alltoall. The global particle count is checked to be unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

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


def exchange(comm, columns: dict[str, np.ndarray], dest: np.ndarray, what: str = "particles",
             return_stats: bool = False):
    """Send row ``i`` of every column to rank ``dest[i]``; return the received columns.

    Rows arrive grouped by source rank, in their original order within each source, so the result
    is deterministic. Works with zero rows on any rank. Collective over ``comm``.
    """
    dest = np.asarray(dest)
    packed = pack_columns(columns)
    n = len(packed)
    if len(dest) != n:
        raise ValueError(f"dest has {len(dest)} entries for {n} rows")
    if n and dest.dtype.kind not in "iu":
        raise ValueError(f"destination ranks must be integers, got dtype {dest.dtype}")
    if n and (dest.min() < 0 or dest.max() >= comm.size):
        raise ValueError(f"destination ranks outside [0, {comm.size}): {dest.min()}..{dest.max()}")
    send_counts = np.bincount(dest, minlength=comm.size).astype(np.int64) if n else np.zeros(comm.size, np.int64)
    itemsize = packed.dtype.itemsize
    rows = packed.view(np.uint8).reshape(n, itemsize)  # one row of bytes per particle
    if n and send_counts.max() < n:  # group the rows by destination (a byte-row take is fast)
        rows = np.take(rows, np.argsort(dest, kind="stable"), axis=0)
    recv_counts = np.empty(comm.size, dtype=np.int64)
    comm.Alltoall(send_counts, recv_counts)
    if comm.size == 1:
        recvbuf = rows.view(packed.dtype).reshape(n)
    else:
        recvbuf = np.empty(int(recv_counts.sum()), dtype=packed.dtype)
        if max(int(send_counts.max(initial=0)), int(recv_counts.max(initial=0))) >= 2**31:
            raise OverflowError("more than 2**31 particles to one rank in one exchange")
        rowtype = MPI.BYTE.Create_contiguous(itemsize).Commit()
        try:
            if max(int(send_counts.sum()), int(recv_counts.sum())) >= 2**31:
                raise OverflowError("more than 2**31 particles through one rank in one exchange")
            send_displ = np.concatenate([[0], np.cumsum(send_counts)[:-1]])
            recv_displ = np.concatenate([[0], np.cumsum(recv_counts)[:-1]])
            comm.Alltoallv(
                [rows, (send_counts.astype(np.int32), send_displ.astype(np.int32)), rowtype],
                [recvbuf.view(np.uint8), (recv_counts.astype(np.int32), recv_displ.astype(np.int32)), rowtype],
            )
        finally:
            rowtype.Free()
    n_global = check_count(comm, n, len(recvbuf), what)
    out = unpack_columns(recvbuf)
    if return_stats:
        stats = ExchangeStats(n, len(recvbuf), int(n * itemsize), int(len(recvbuf) * itemsize), n_global)
        return out, stats
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
