"""Friends-of-friends: brute force, periodic clumps, and the distributed entry point."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.nbody.fof import (
    find_halos,
    find_halos_distributed,
    fof_labels,
    periodic_com,
)


def _brute_force_groups(pos, box, b):
    n = len(pos)
    d = pos[:, None, :] - pos[None, :, :]
    d -= box * np.round(d / box)
    adj = (d**2).sum(-1) < b * b
    label = np.arange(n)
    changed = True
    while changed:  # label propagation to the minimum over friends
        new = np.where(adj, label[None, :], n).min(axis=1)
        new = np.minimum(new, label)
        changed = bool((new != label).any())
        label = new
    return label


def _partition(labels):
    groups = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    return sorted(tuple(g) for g in groups.values())


def test_fof_equals_brute_force():
    rng = np.random.default_rng(5)
    box, b = 10.0, 0.9
    pos = rng.uniform(-box / 2, box / 2, (400, 3))
    assert _partition(fof_labels(pos, box, b)) == _partition(_brute_force_groups(pos, box, b))


def _clumps(rng, box):
    """Three clumps: one across the x boundary, one across the corner, one in the middle."""
    centres = np.array([[box / 2 - 0.05, 1.0, -2.0], [-box / 2 + 0.02, box / 2 - 0.03, -box / 2 + 0.01],
                        [0.0, 0.0, 0.0]])
    sizes = [50, 30, 25]
    pos = np.concatenate([c + rng.normal(0, 0.08, (s, 3)) for c, s in zip(centres, sizes)])
    pos = np.mod(pos + box / 2, box) - box / 2
    field = rng.uniform(-box / 2, box / 2, (40, 3))  # sparse field particles: no friends
    return np.concatenate([pos, field]), centres, sizes


def test_planted_clumps_across_the_boundary():
    rng = np.random.default_rng(1)
    box = 100.0
    pos, centres, sizes = _clumps(rng, box)
    com, npart = find_halos(pos, box, linking_length=0.5, min_members=20)
    assert sorted(npart.tolist()) == sorted(sizes)
    for c, s in zip(centres, sizes):
        i = int(np.flatnonzero(npart == s)[0])
        d = com[i] - c
        d -= box * np.round(d / box)
        assert np.all(np.abs(d) < 0.05)  # periodic-safe centre of mass
        assert np.all((com[i] >= -box / 2) & (com[i] < box / 2))
    # fewer members than the minimum -> not a halo
    _, npart = find_halos(pos, box, linking_length=0.5, min_members=40)
    assert npart.tolist() == [50]


def test_periodic_com_wraps():
    box = 10.0
    pos = np.array([[4.9, 0, 0], [-4.9, 0, 0], [4.95, 0, 0], [-4.95, 0, 0]])
    com = periodic_com(pos, np.zeros(4, np.int64), box)
    assert -box / 2 <= com[0, 0] < box / 2
    d = com[0, 0] - 5.0
    d -= box * np.round(d / box)
    assert abs(d) < 1e-9


@pytest.mark.mpi
def test_distributed_fof_same_on_all_rank_counts(comm):
    rng = np.random.default_rng(2)
    box = 100.0
    pos, _, _ = _clumps(rng, box)
    mine = np.array_split(pos, comm.size)[comm.rank]
    com, npart = find_halos_distributed(comm, mine, box, 0.5, 20)
    ref_com, ref_n = find_halos(pos.astype(np.float32), box, 0.5, 20)
    got = comm.bcast((com, npart) if comm.rank == 0 else None, root=0)
    if comm.rank != 0:
        assert len(npart) == 0
    np.testing.assert_array_equal(got[1], ref_n)
    np.testing.assert_allclose(got[0], ref_com, atol=1e-9)


def test_fof_refuses_too_many_particles(monkeypatch):
    import lagbias_mpi.nbody.fof as fof

    monkeypatch.setattr(fof, "MAX_FOF_PARTICLES", 10)
    with pytest.raises(ValueError, match="at most 10 particles"):  # only the old gather path refuses
        fof.find_halos_distributed(MPI.COMM_SELF, np.zeros((11, 3)), 10.0, 0.5, 2, method="gather")
    com, npart = fof.find_halos_distributed(MPI.COMM_SELF, np.zeros((11, 3)), 10.0, 0.5, 2)
    assert npart.tolist() == [11] and np.allclose(com, 0.0)


# --- distributed slab FoF: equal to the serial find_halos on 1, 2, 3 ranks -------------------------

def _scatter(comm, pos, how, seed=0):
    """This rank's share of the global particles ``pos``, not by position."""
    n = len(pos)
    if how == "split":  # contiguous index chunks
        return pos[np.array_split(np.arange(n), comm.size)[comm.rank]]
    if how == "random":  # every particle on an arbitrary rank
        return pos[np.random.default_rng(seed).integers(0, comm.size, n) == comm.rank]
    if how == "reversed":  # sorted by x, slabs handed out backwards: every particle must move
        order = np.argsort(pos[:, 0], kind="stable")
        return pos[np.array_split(order, comm.size)[comm.size - 1 - comm.rank]]
    if how == "last":  # all on the last rank, the others own nothing
        return pos if comm.rank == comm.size - 1 else pos[:0]
    if how == "skip1":  # rank 1 (if any) owns nothing
        owner = np.random.default_rng(seed).integers(0, comm.size, n)
        if comm.size > 1:
            owner[owner == 1] = 0
        return pos[owner == comm.rank]
    raise ValueError(how)


def _assert_same_as_serial(comm, pos, box, b, min_members, how, **kw):
    pos = np.asarray(pos, dtype=np.float32)
    com, npart = find_halos_distributed(comm, _scatter(comm, pos, how), box, b, min_members, **kw)
    if comm.rank != 0:
        assert com.shape == (0, 3) and len(npart) == 0
    com, npart = comm.bcast((com, npart) if comm.rank == 0 else None, root=0)
    ref_com, ref_n = find_halos(pos, box, b, min_members)
    assert npart.dtype == np.int64 and com.dtype == np.float64
    np.testing.assert_array_equal(npart, ref_n)
    assert np.all((com >= -box / 2) & (com < box / 2))
    d = com - ref_com
    d -= box * np.round(d / box)  # a centre at +-box/2 may round to either side
    assert np.abs(d).max(initial=0.0) <= 1e-10 * box
    return ref_n


def _face_clumps(rng, box):
    """Clumps across every slab face of 1, 2 and 3 equal x-slabs (x = 0, +-box/6, -box/2), one of
    them across the x, y and z boundaries at once, plus field particles."""
    centres = np.array([[0.0, 3.0, 4.0], [-box / 6, -10.0, 20.0], [box / 6, 30.0, -box / 2 + 0.02],
                        [-box / 2 + 0.01, box / 2 - 0.02, -box / 2 + 0.03], [box / 2 - 0.04, -30.0, 10.0],
                        [box / 6 + 0.3, 30.0, 8.0]])
    sizes = [60, 45, 33, 28, 22, 19]
    pos = np.concatenate([c + rng.normal(0, 0.1, (s, 3)) for c, s in zip(centres, sizes)])
    pos = np.mod(pos + box / 2, box) - box / 2
    return np.concatenate([pos, rng.uniform(-box / 2, box / 2, (200, 3))])


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["split", "random", "reversed", "last", "skip1"])
def test_slab_fof_uniform_many_small_groups(comm, how):
    rng = np.random.default_rng(11)
    box = 10.0
    pos = rng.uniform(-box / 2, box / 2, (3000, 3))  # mean spacing 0.69: b = 0.3 -> many small groups
    ref_n = _assert_same_as_serial(comm, pos, box, 0.3, 2, how)
    assert len(ref_n) > 200 and ref_n.max() > 5


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["split", "random", "reversed", "last", "skip1"])
def test_slab_fof_clumps_across_faces_and_boundaries(comm, how):
    rng = np.random.default_rng(3)
    box = 100.0
    pos, _, _ = _clumps(rng, box)
    assert _assert_same_as_serial(comm, pos, box, 0.5, 20, how).tolist() == [50, 30, 25]
    pos = _face_clumps(rng, box)
    assert len(_assert_same_as_serial(comm, pos, box, 0.5, 15, how)) == 6


@pytest.mark.mpi
def test_slab_fof_groups_of_one_and_two(comm):
    rng = np.random.default_rng(4)
    box = 100.0
    pos = _face_clumps(rng, box)
    # min_members = 1: every particle is in exactly one group (singletons included), nothing is lost
    ones = _assert_same_as_serial(comm, pos, box, 0.5, 1, "random")
    assert ones.sum() == len(pos) and (ones == 1).sum() >= 150  # most of the 200 field particles are alone
    # min_members = 2: the same groups without the singletons (min_members applies after merging)
    twos = _assert_same_as_serial(comm, pos, box, 0.5, 2, "random")
    assert sorted(twos.tolist()) == sorted(ones[ones >= 2].tolist()) and twos.min() >= 2
    assert twos.sum() == len(pos) - (ones == 1).sum()


@pytest.mark.mpi
def test_slab_fof_slabs_thinner_than_linking_length(comm):
    """Thin slabs (box / ranks < linking length; on 3 ranks here) take ghosts from further ranks."""
    rng = np.random.default_rng(6)
    box = 10.0
    b = 3.5  # > box / 3
    # compact clumps chained in x across the periodic boundary (4.0 -> 5.4 = -4.6 -> -1.6), and a pair
    # of clumps linked straight across the whole middle slab on 3 ranks (x = -1.72 -> 1.72): that
    # link is seen only if slab 0 gets ghosts from slab 2 in the direct direction (two slabs away)
    centres = np.array([[4.0, 0.0, 0.0], [-4.6, 0.0, 0.0], [-1.6, 0.5, 0.0], [-1.72, 4.0, 4.0], [1.72, 4.0, 4.0]])
    pos = np.concatenate([c + rng.normal(0, s, (n, 3)) for c, n, s in
                          zip(centres, [7, 5, 4, 3, 3], [0.05, 0.05, 0.05, 0.01, 0.01])])
    pos = np.mod(pos + box / 2, box) - box / 2
    for how in ("random", "reversed", "last"):
        ref_n = _assert_same_as_serial(comm, pos, box, b, 2, how)
        assert ref_n.tolist() == [16, 6]


@pytest.mark.mpi
def test_slab_fof_empty_input(comm):
    com, npart = find_halos_distributed(comm, np.zeros((0, 3), np.float32), 10.0, 0.5, 2)
    assert com.shape == (0, 3) and len(npart) == 0


class _RecordingComm:
    """Pass-through communicator that counts the bytes every rooted/all- collective carries (all but
    the Alltoall(v) of the particle exchange, which moves O(N / ranks) per rank)."""

    RECORDED = ("gather", "Gather", "Gatherv", "allgather", "Allgather", "Allgatherv", "bcast", "Bcast",
                "scatter", "Scatter", "Scatterv", "reduce", "Reduce", "send", "Send", "recv", "Recv")

    def __init__(self, comm):
        self._comm = comm
        self.calls = []

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in self.RECORDED:
            return attr

        def wrapped(*args, **kwargs):
            import pickle

            obj = args[0] if args else None
            nbytes = obj.nbytes if isinstance(obj, np.ndarray) else len(pickle.dumps(obj, protocol=5))
            self.calls.append((name, nbytes))
            return attr(*args, **kwargs)

        return wrapped


@pytest.mark.mpi
def test_slab_fof_gathers_nothing_of_size_n(comm):
    rng = np.random.default_rng(8)
    box = 100.0
    n_field = 20000
    pos = np.concatenate([_face_clumps(rng, box), rng.uniform(-box / 2, box / 2, (n_field, 3))]).astype(np.float32)
    n = len(pos)
    mine = _scatter(comm, pos, "random")
    rec = _RecordingComm(comm)
    com, npart = find_halos_distributed(rec, mine, box, 0.5, 15)
    sent = comm.allreduce(sum(b for _, b in rec.calls))
    assert sent < 0.02 * 12 * n, rec.calls  # halos, edges and counts only: no positions
    assert all(name != "gather" or b < 0.02 * 12 * n for name, b in rec.calls)
    got = comm.bcast(npart if comm.rank == 0 else None, root=0)
    assert got.tolist() == find_halos(pos, box, 0.5, 15)[1].tolist()
    # the recorder sees the old path gather all positions
    rec_old = _RecordingComm(comm)
    find_halos_distributed(rec_old, mine, box, 0.5, 15, method="gather")
    assert comm.allreduce(sum(b for name, b in rec_old.calls if name == "gather")) >= 12 * n
