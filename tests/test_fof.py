"""Friends-of-friends: brute force, periodic clumps, and the distributed entry point."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.fof import find_halos, find_halos_distributed, fof_labels, periodic_com


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
    import lagbias_mpi.fof as fof

    monkeypatch.setattr(fof, "MAX_FOF_PARTICLES", 10)
    with pytest.raises(ValueError, match="at most 10 particles"):
        fof.find_halos_distributed(MPI.COMM_SELF, np.zeros((11, 3)), 10.0, 0.5, 2)
