"""Friends-of-friends halos in a periodic box.

Particles closer than the linking length ``b * box / ppd`` are friends; halos are the connected
components with at least ``min_members`` particles. scipy's periodic ``cKDTree.query_pairs`` finds
the pairs and ``csgraph.connected_components`` the groups. The centre of mass ``x_com`` is
periodic-safe: members are unwrapped relative to one member, averaged, and wrapped back.

The distributed entry point gathers the (float32) final positions on rank 0 and runs there: fine for
the mock sizes, refused above ``MAX_FOF_PARTICLES`` (300^3 = 2.7e7; about 3 GB on rank 0) with a
clear message.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

MAX_FOF_PARTICLES = 300**3


def fof_labels(pos: np.ndarray, box: float, linking_length: float) -> np.ndarray:
    """Group label of each particle (positions in Mpc/h, any periodic image; linking length Mpc/h)."""
    n = len(pos)
    if n == 0:
        return np.zeros(0, np.int64)
    if not 0 < linking_length < 0.5 * box:
        raise ValueError(f"linking length {linking_length} must be in (0, box/2)")
    data = np.mod(np.asarray(pos, dtype=np.float64) + 0.5 * box, box)
    data[data >= box] = 0.0
    tree = cKDTree(data, boxsize=box)
    pairs = tree.query_pairs(linking_length, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def periodic_com(pos: np.ndarray, labels: np.ndarray, box: float) -> np.ndarray:
    """Centre of mass (n_groups, 3) in [-box/2, box/2) of the particles of each label 0..max."""
    pos = np.asarray(pos, dtype=np.float64)
    n_groups = int(labels.max()) + 1 if len(labels) else 0
    first = np.full(n_groups, -1, np.int64)
    order = np.arange(len(labels))[::-1]
    first[labels[order]] = order  # the last write wins: the first member of each group
    ref = pos[first[labels]]
    d = pos - ref
    d -= box * np.round(d / box)
    counts = np.bincount(labels, minlength=n_groups)
    com = np.stack([np.bincount(labels, weights=d[:, i], minlength=n_groups) for i in range(3)], axis=1)
    com = pos[first] + com / counts[:, None]
    out = np.mod(com + 0.5 * box, box) - 0.5 * box
    out[out >= 0.5 * box] = -0.5 * box
    return out


def find_halos(pos: np.ndarray, box: float, linking_length: float,
               min_members: int) -> tuple[np.ndarray, np.ndarray]:
    """FoF halos of ``pos`` (serial): (x_com (nh, 3) float64 Mpc/h, npart (nh,) int64), sorted by
    decreasing npart (ties by position for determinism)."""
    labels = fof_labels(pos, box, linking_length)
    if len(labels) == 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    counts = np.bincount(labels)
    keep = counts >= min_members
    remap = np.full(len(counts), -1, np.int64)
    remap[keep] = np.arange(int(keep.sum()))
    member = remap[labels] >= 0
    if not member.any():
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    com = periodic_com(pos[member], remap[labels[member]], box)
    npart = counts[keep].astype(np.int64)
    order = np.lexsort((com[:, 2], com[:, 1], com[:, 0], -npart))
    return com[order], npart[order]


def find_halos_distributed(comm, pos: np.ndarray, box: float, linking_length: float,
                           min_members: int) -> tuple[np.ndarray, np.ndarray]:
    """FoF over all ranks' particles, run on rank 0 after gathering the positions. Rank 0 returns
    every halo, the other ranks none. Refuses more than ``MAX_FOF_PARTICLES`` before gathering."""
    n_total = comm.allreduce(len(pos))
    if n_total > MAX_FOF_PARTICLES:
        raise ValueError(f"FoF runs on one rank and accepts at most {MAX_FOF_PARTICLES} particles "
                         f"(300^3); this simulation has {n_total}. Use a smaller ppd or halos.kind=planted")
    parts = comm.gather(np.ascontiguousarray(pos, dtype=np.float32), root=0)
    if comm.rank != 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    return find_halos(np.concatenate(parts), box, linking_length, min_members)
