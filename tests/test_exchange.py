"""Particle exchange: every row of every column arrives exactly once, at the right rank."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.mpi.exchange import exchange, pack_columns, unpack_columns


def make_columns(rank, n, seed=0):
    """Several dtypes and shapes; ``uid`` identifies each row globally."""
    rng = np.random.default_rng([seed, rank])
    uid = rank * 1_000_000 + np.arange(n, dtype=np.int64)
    return {
        "uid": uid,
        "pos": rng.random((n, 3)).astype(np.float32),
        "lagr": rng.integers(0, 2**31 - 1, (n, 3)).astype(np.int32),
        "flag": rng.random(n) < 0.5,
        "weight": rng.random(n),
        "mat": rng.random((n, 2, 2)),
    }


def all_rows(comm, cols):
    """Every column concatenated over ranks, rows sorted by uid."""
    parts = comm.allgather(cols)
    full = {k: np.concatenate([p[k] for p in parts]) for k in cols}
    order = np.argsort(full["uid"])
    return {k: v[order] for k, v in full.items()}


def check_exchange(comm, cols, dest):
    out, stats = exchange(comm, cols, dest, return_stats=True)
    sent = all_rows(comm, {**cols, "dest": np.asarray(dest, np.int64)})
    got = all_rows(comm, {**out, "dest": np.full(len(out["uid"]), comm.rank, np.int64)})
    for k in cols:
        assert out[k].dtype == cols[k].dtype and out[k].shape[1:] == cols[k].shape[1:]
        assert out[k].flags.c_contiguous
        np.testing.assert_array_equal(got[k], sent[k])  # each row exactly once, unchanged
    np.testing.assert_array_equal(got["dest"], sent["dest"])  # ... on the rank it was sent to
    # order within each source is kept; sources arrive in rank order
    src = out["uid"] // 1_000_000
    assert np.all(np.diff(src) >= 0)
    for s in np.unique(src):
        assert np.all(np.diff(out["uid"][src == s]) > 0)
    row = sum(v.dtype.itemsize * int(np.prod(v.shape[1:])) for v in cols.values())
    assert stats.n_sent == len(dest) and stats.n_received == len(out["uid"])
    assert stats.bytes_sent == row * len(dest) and stats.bytes_received == row * len(out["uid"])
    assert stats.n_global == comm.allreduce(len(dest))
    return out


@pytest.mark.mpi
def test_random_destinations(comm):
    n = 50 + 17 * comm.rank
    cols = make_columns(comm.rank, n)
    dest = np.random.default_rng([1, comm.rank]).integers(0, comm.size, n)
    check_exchange(comm, cols, dest)


@pytest.mark.mpi
def test_some_ranks_without_particles(comm):
    n = 40 if comm.rank == comm.size - 1 else 0
    cols = make_columns(comm.rank, n)
    dest = np.random.default_rng([2, comm.rank]).integers(0, comm.size, n)
    check_exchange(comm, cols, dest)


@pytest.mark.mpi
def test_nobody_has_particles(comm):
    out = check_exchange(comm, make_columns(comm.rank, 0), np.zeros(0, np.int64))
    assert all(len(v) == 0 for v in out.values())


@pytest.mark.mpi
def test_all_to_one_rank(comm):
    n = 30
    target = comm.size - 1
    out = check_exchange(comm, make_columns(comm.rank, n), np.full(n, target, np.int32))
    assert len(out["uid"]) == (n * comm.size if comm.rank == target else 0)


class RecordingComm:
    """Forwards to a communicator, recording the Alltoallv datatypes and counts."""

    def __init__(self, comm):
        self._comm, self.calls = comm, []

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def Alltoallv(self, send, recv):  # noqa: N802 - MPI name
        self.calls.append((send[1][0].copy(), send[2].Get_size(), recv[1][0].copy(), recv[2].Get_size()))
        return self._comm.Alltoallv(send, recv)


@pytest.mark.mpi(min_size=2)
def test_large_rows_use_a_row_datatype(comm):
    """The >2 GB path: counts are in rows with a contiguous datatype of one row (32 KB here), so
    the byte count never enters an int32. Checked without allocating gigabytes."""
    n = 5 + comm.rank
    rng = np.random.default_rng([3, comm.rank])
    cols = {"uid": comm.rank * 1_000_000 + np.arange(n, dtype=np.int64), "big": rng.random((n, 4096))}
    dest = rng.integers(0, comm.size, n)
    rec = RecordingComm(comm)
    out = exchange(rec, cols, dest)
    assert len(rec.calls) == 1  # one packed Alltoallv
    send_counts, send_size, recv_counts, recv_size = rec.calls[0]
    row = 8 + 4096 * 8
    assert send_size == recv_size == row
    np.testing.assert_array_equal(send_counts, np.bincount(dest, minlength=comm.size))
    assert recv_counts.sum() == len(out["uid"])
    sent = all_rows(comm, cols)
    got = all_rows(comm, out)
    np.testing.assert_array_equal(got["big"], sent["big"])


@pytest.mark.mpi
def test_bad_destinations_refused(comm):
    cols = {"a": np.arange(4.0)}
    with pytest.raises(ValueError, match="outside"):
        exchange(comm, cols, np.array([0, 0, comm.size, 0]))
    with pytest.raises(ValueError, match="outside"):
        exchange(comm, cols, np.array([0, -1, 0, 0]))
    with pytest.raises(ValueError, match="entries"):
        exchange(comm, cols, np.array([0, 0]))
    with pytest.raises(ValueError, match="integer"):
        exchange(comm, cols, np.zeros(4))


def test_bad_columns_refused():
    with pytest.raises(ValueError, match="different lengths"):
        pack_columns({"a": np.zeros(3), "b": np.zeros(4)})
    with pytest.raises(ValueError, match="at least one"):
        pack_columns({})


def test_pack_unpack_round_trip():
    cols = make_columns(0, 7)
    back = unpack_columns(pack_columns(cols))
    for k, v in cols.items():
        np.testing.assert_array_equal(back[k], v)


def test_single_rank_keeps_everything():
    cols = make_columns(0, 20)
    out = exchange(MPI.COMM_SELF, cols, np.zeros(20, np.int64))
    for k, v in cols.items():
        np.testing.assert_array_equal(out[k], v)



@pytest.mark.mpi
def test_exchange_in_rounds_equals_one_round(comm):
    """Small rounds (a few rows each, a different number of rows per rank, one rank without rows)
    give exactly the result of one round: same rows, same order."""
    rng = np.random.default_rng(40 + comm.rank)
    n = [37, 0, 53][comm.rank % 3]
    cols = {"a": rng.standard_normal((n, 3)).astype(np.float32), "id": np.arange(n, dtype=np.uint64) + 1000 * comm.rank}
    dest = rng.integers(0, comm.size, n)
    one = exchange(comm, cols, dest)
    many, st = exchange(comm, cols, dest, return_stats=True, chunk_bytes=5 * 20)
    for name in cols:
        assert np.array_equal(one[name], many[name])
    assert st.n_received == len(one["id"]) and st.n_global == comm.allreduce(n)


@pytest.mark.mpi
@pytest.mark.parametrize("chunk_bytes", [7 * 20, 1 << 27])
def test_consuming_exchange_equals_plain(comm, chunk_bytes):
    """consume=True gives the plain exchange's result (rows, order), empties the dict, takes the
    destinations by name without sending them, and leaves an array the caller still holds whole."""
    rng = np.random.default_rng(60 + comm.rank)
    n = [41, 0, 66][comm.rank % 3]
    a = rng.standard_normal((n, 3)).astype(np.float32)
    ids = np.arange(n, dtype=np.uint64) + 1000 * comm.rank
    dest = rng.integers(0, comm.size, n).astype(np.int32)
    plain = exchange(comm, {"a": a, "id": ids}, dest, chunk_bytes=chunk_bytes)
    cols = {"a": a.copy(), "id": ids, "_d": dest.copy()}  # "a" only in the dict; "id" also held here
    got, st = exchange(comm, cols, "_d", return_stats=True, chunk_bytes=chunk_bytes, consume=True)
    assert cols == {} and set(got) == {"a", "id"}
    for name in got:
        assert np.array_equal(got[name], plain[name])
    assert st.bytes_sent == n * (12 + 8)  # the destinations do not travel
    assert np.array_equal(ids, np.arange(n, dtype=np.uint64) + 1000 * comm.rank)  # not cut


def test_shrink_rows_only_unshared():
    from lagbias_mpi.core.arrays import shrink_rows
    hold = {"x": np.arange(12.0).reshape(6, 2).copy()}
    assert shrink_rows(hold, "x", 2) and hold["x"].shape == (2, 2)
    assert np.array_equal(hold["x"], [[0, 1], [2, 3]])
    other = hold["x"]
    assert not shrink_rows(hold, "x", 1) and hold["x"].shape == (2, 2)  # referenced elsewhere
    del other
    view = {"v": np.arange(10.0)[2:]}
    assert not shrink_rows(view, "v", 3) and len(view["v"]) == 8  # does not own its data


def test_exchange_dest_by_name_needs_consume():
    with pytest.raises(ValueError, match="consume"):
        exchange(MPI.COMM_SELF, {"a": np.zeros(3), "d": np.zeros(3, np.int64)}, "d")


def test_permute_rows_in_place_equals_scatter():
    from lagbias_mpi.core.arrays import permute_rows_in_place
    rng = np.random.default_rng(4)
    for shape, dtype in [((500, 7), np.float32), ((500,), np.uint64), ((500, 3), np.int32), ((1,), np.float64),
                         ((0, 2), np.float32)]:
        a = (rng.random(shape) * 1000).astype(dtype)
        dest = rng.permutation(shape[0])
        ref = np.empty_like(a)
        ref[dest] = a
        permute_rows_in_place(a, dest.astype(np.int32))
        assert np.array_equal(a, ref)
    with pytest.raises(ValueError, match="permutation"):
        permute_rows_in_place(np.arange(4.0), np.array([1, 1, 2, 3]))


def test_one_rank_result_never_aliases_a_held_input():
    """On one rank a consumed array held by nothing else is handed over; any other is copied, so
    that a caller changing the result in place (the Eulerian sort) cannot change its own arrays;
    without consume the inputs themselves are returned (no copy)."""
    held = np.arange(6.0)
    cols = {"held": held, "own": np.arange(6.0) * 2}
    out = exchange(MPI.COMM_SELF, cols, np.zeros(6, np.int64), consume=True)
    assert out["held"] is not held and np.array_equal(out["held"], held)
    out["held"][0] = -1.0
    assert held[0] == 0.0
    plain = exchange(MPI.COMM_SELF, {"a": held}, np.zeros(6, np.int64))  # not consumed: no copy
    assert plain["a"] is held
