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

from lagbias_mpi.core.arrays import held_only_by, shrink_rows
from lagbias_mpi.core.faults import fail_point
from lagbias_mpi.core.memory import small_pages
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


EXCHANGE_CHUNK_BYTES = 1 << 22  # bytes of records each rank sends per round (4 MiB)


def exchange(comm, columns: dict[str, np.ndarray], dest, what: str = "particles",
             return_stats: bool = False, chunk_bytes: int | None = None, consume: bool = False):
    """Send row ``i`` of every column to rank ``dest[i]``; return the received columns.

    Rows arrive grouped by source rank, in their original order within each source, so the result
    is deterministic (and independent of ``chunk_bytes``). Works with zero rows on any rank.
    Collective over ``comm``. The rows go in rounds of at most ``chunk_bytes`` per rank, from the
    end of the input, into preallocated result columns (whose pages become resident as they fill).

    ``consume``: the exchange takes the arrays out of ``columns`` (the dict is emptied; ``dest`` may
    be the name of one of its columns, used as destinations and not sent) and cuts every input array
    to the rows not yet sent after each round, so that input and result together hold about one
    copy of the rows plus one round (:func:`shrink_rows`; an array the caller still references
    elsewhere is not cut). Without it the exchange holds input + result + O(chunk) bytes.
    """
    chunk_bytes = EXCHANGE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    src = {name: columns.pop(name) for name in list(columns)} if consume else dict(columns)
    if isinstance(dest, str):
        if not consume or dest not in src:
            raise ValueError("dest given by name needs consume=True and a column of that name")
        dest = src.pop(dest)
    hold = {"dest": np.asarray(dest)}
    del dest
    if not src:
        raise ValueError("exchange needs at least one column")
    lengths = {name: len(col) for name, col in src.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    n = next(iter(lengths.values()))
    d_all = hold["dest"]
    if len(d_all) != n:
        raise ValueError(f"dest has {len(d_all)} entries for {n} rows")
    if n and d_all.dtype.kind not in "iu":
        raise ValueError(f"destination ranks must be integers, got dtype {d_all.dtype}")
    if n and (d_all.min() < 0 or d_all.max() >= comm.size):
        raise ValueError(f"destination ranks outside [0, {comm.size}): {d_all.min()}..{d_all.max()}")
    dtype = np.dtype([(name, col.dtype, col.shape[1:]) for name, col in src.items()])
    itemsize = dtype.itemsize
    fail_point(comm, "exchange")  # tests: one rank fails while the others wait in the Alltoall
    if comm.size == 1:  # consumed: arrays held only by the dict are handed over, others copied (a
        # consumed result never aliases an array the caller still holds: callers change it in place);
        # not consumed: the inputs themselves when contiguous (no copy, as a read-only result)
        out = {}
        for name in list(src):
            if not consume:
                out[name] = np.ascontiguousarray(src.pop(name))
            else:
                out[name] = src.pop(name) if held_only_by(src, name) else np.array(src.pop(name), order="C")
        del src, d_all, hold
        n_global = check_count(comm, n, n, what)
        stats = ExchangeStats(n, n, int(n * itemsize), int(n * itemsize), n_global)
        return (out, stats) if return_stats else out
    send_total = np.bincount(d_all, minlength=comm.size).astype(np.int64) if n else np.zeros(comm.size, np.int64)
    del d_all
    recv_total = np.empty(comm.size, dtype=np.int64)
    comm.Alltoall(send_total, recv_total)
    n_recv = int(recv_total.sum())
    with small_pages():  # filled at one front per source rank: 2 MiB pages would make it resident at once
        out = {name: np.empty((n_recv,) + col.shape[1:], col.dtype) for name, col in src.items()}
    end = np.cumsum(recv_total)  # one past the last unfilled row of each source (filled backwards)
    chunk_rows = max(1, int(chunk_bytes) // max(itemsize, 1))
    n_rounds = comm.allreduce(-(-n // chunk_rows), op=MPI.MAX)
    rowtype = MPI.BYTE.Create_contiguous(itemsize).Commit()
    try:
        for r in range(max(n_rounds, 1)):
            hi = max(n - r * chunk_rows, 0)
            lo = max(hi - chunk_rows, 0)
            d = hold["dest"][lo:hi]
            order = np.argsort(d, kind="stable")
            packed = np.empty(hi - lo, dtype=dtype)
            for name, col in src.items():
                packed[name] = col[lo:hi][order]
            del order, col
            sc = np.bincount(d, minlength=comm.size).astype(np.int64)
            del d
            if consume:  # the rows of this round are packed: give their memory back
                for name in list(src):
                    shrink_rows(src, name, lo)
                shrink_rows(hold, "dest", lo)
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
            # rows from source s go to out[end[s] - rc[s] : end[s]] (earlier rounds sent later rows)
            target = np.repeat(end - rc - rd, rc) + np.arange(len(recvbuf), dtype=np.int64)
            for name in out:
                out[name][target] = recvbuf[name]
            end -= rc
            del recvbuf, target
    finally:
        rowtype.Free()
    del src, hold
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
