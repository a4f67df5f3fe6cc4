"""Friends-of-friends halos in a periodic box.

Particles closer than the linking length ``b * box / ppd`` are friends; halos are the connected
components with at least ``min_members`` particles. scipy's periodic ``cKDTree.query_pairs`` finds
the pairs and ``csgraph.connected_components`` the groups. The centre of mass ``x_com`` is
periodic-safe: members are unwrapped relative to one member, averaged, and wrapped back.

The distributed entry point ``find_halos_distributed`` (any rank may hold any particle; rank 0
returns the catalogue, sorted as ``find_halos``) runs a slab FoF by default; no rank ever holds more
than its slab plus ghosts:

1. particles go to equal-width x-slabs (one per rank; ``exchange.exchange``) with a global index
   (exscan offset + local index) that picks each group's reference member deterministically;
2. each slab receives ghost copies of the particles within one linking length of it, periodic in
   x. A slab thinner than the linking length (many ranks, small box) gets ghosts from every slab
   within reach (``ceil(b / width)`` on each side), so there is no fallback and no limit;
3. local FoF on owned + ghosts: ``cKDTree(boxsize=[0, box, box])`` (y, z periodic, x open);
4. a ghost in a local group that holds owned particles links that group to its original's group
   on the owner rank (sent back with one more exchange); the (small) list of such group pairs is
   resolved with union-find (``connected_components``) on rank 0 and each rank gets back the root
   of its boundary groups;
5. per group, each rank sums count and positions unwrapped around the member with the smallest
   global index of its OWNED particles (ghosts never count); rank 0 combines the partial sums of
   boundary groups (shifting by the minimal image between references) and of complete local groups
   with at least ``min_members``, and applies ``min_members`` after merging.

Only the halo partial sums, the boundary group pairs and per-rank counts reach rank 0. The old path
(``method="gather"``: positions gathered on rank 0, refused above ``MAX_FOF_PARTICLES`` = 300^3,
about 3 GB on rank 0) is kept for comparison.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.mesh.grid import wrap_centred, wrap_unit
from lagbias_mpi.mpi.exchange import exchange

log = get_logger("fof")


log = get_logger("fof")


MAX_FOF_PARTICLES = 300**3


def fof_labels(pos: np.ndarray, box: float, linking_length: float) -> np.ndarray:
    """Group label of each particle (positions in Mpc/h, any periodic image; linking length Mpc/h)."""
    n = len(pos)
    if n == 0:
        return np.zeros(0, np.int64)
    if not 0 < linking_length < 0.5 * box:
        raise ValueError(f"linking length {linking_length} must be in (0, box/2)")
    data = wrap_unit(pos, box)
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
    out = wrap_centred(com, box)
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


def _ghost_rows(x: np.ndarray, rank: int, size: int, box: float, reach: float):
    """Ghost copies of owned particles (x in ``[0, box)``, owned by slab ``rank``) for the other slabs.

    Slab ``R`` (unwrapped index, rank ``R % size``) needs every particle whose image lies within
    ``reach`` of ``[R w, (R + 1) w)``, w = box / size. ``K = ceil(reach / w)`` slabs on each side can
    be within reach, so slabs thinner than the linking length get ghosts from further ranks (and on
    few ranks a rank can receive several images of one particle, or of its own particles: every link
    shorter than the linking length < box/2 between images is a true link, so this is harmless).
    Returns (local indices, destination ranks, x of the image in the destination's frame).
    """
    w = box / size
    k_max = int(np.ceil(reach / w))
    if k_max > 1 and rank == 0:
        log.info("FoF: slabs (%.3g Mpc/h) thinner than the linking length: ghosts from %d slabs each side",
                 w, k_max)
    idx, dest, ximg = [], [], []
    for k in range(1, k_max + 1):
        for big in (rank + k, rank - k):  # unwrapped slab index of the destination
            lo, hi = big * w - reach, (big + 1) * w + reach
            sel = np.flatnonzero((x >= lo) & (x < hi))
            if len(sel):
                shift = (big // size) * box
                idx.append(sel)
                dest.append(np.full(len(sel), big % size, np.int64))
                ximg.append(x[sel] - shift)
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(idx), np.concatenate(dest), np.concatenate(ximg)


def _resolve_equivalences(comm, edges: np.ndarray, label_offsets: np.ndarray):
    """Union-find of global component labels on rank 0 from the (small) boundary edge list.

    ``edges`` (m, 2) int64 pairs of global labels that are the same group. Returns on every rank the
    sorted labels of this rank's components that take part in an edge and the root (smallest label
    of the merged group) of each. Only the edges and the per-rank mappings travel.
    """
    all_edges = comm.gather(edges, root=0)
    if comm.rank == 0:
        e = np.concatenate(all_edges) if all_edges else np.zeros((0, 2), np.int64)
        nodes, inv = np.unique(e.ravel(), return_inverse=True)
        inv = inv.reshape(-1, 2)
        graph = coo_matrix((np.ones(len(e), np.int8), (inv[:, 0], inv[:, 1])), shape=(len(nodes),) * 2)
        _, comp = connected_components(graph, directed=False)
        root = np.full(comp.max() + 1 if len(comp) else 0, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(root, comp, nodes)
        root_of = root[comp]
        cuts = np.searchsorted(nodes, label_offsets)
        pieces = [(nodes[cuts[r]:cuts[r + 1]], root_of[cuts[r]:cuts[r + 1]]) for r in range(comm.size)]
    else:
        pieces = None
    return comm.scatter(pieces, root=0)


def _find_halos_slab(comm, pos: np.ndarray, box: float, linking_length: float,
                     min_members: int) -> tuple[np.ndarray, np.ndarray]:
    """Slab-decomposed FoF: no particle is gathered on one rank (see :func:`find_halos_distributed`)."""
    size, rank = comm.size, comm.rank
    if not 0 < linking_length < 0.5 * box:
        raise ValueError(f"linking length {linking_length} must be in (0, box/2)")
    pos = np.asarray(pos)
    n_in = len(pos)
    gid0 = comm.exscan(n_in) if size > 1 else 0
    gid0 = gid0 or 0
    data = wrap_unit(pos.reshape(n_in, 3), box)
    # 1. route to equal-width x-slabs, with a global index (rank offset + local index)
    w = box / size
    owner = np.minimum((data[:, 0] / w).astype(np.int64), size - 1)
    got = exchange(comm, {"x": data, "gid": gid0 + np.arange(n_in, dtype=np.int64)}, owner, what="fof particles")
    own_x, own_gid = got["x"], got["gid"]
    n_own = len(own_x)
    # 2. ghosts from the slabs within reach (a hair more than the linking length: a superset is safe)
    reach = linking_length * (1 + 1e-9) + 1e-12 * box
    g_idx, g_dest, g_ximg = _ghost_rows(own_x[:, 0], rank, size, box, reach)
    g_pos = own_x[g_idx]
    g_pos[:, 0] = g_ximg
    ghosts = exchange(comm, {"x": g_pos, "src_idx": g_idx, "src": np.full(len(g_idx), rank, np.int64)},
                      g_dest, what="fof ghosts")
    del g_idx, g_dest, g_ximg, g_pos
    # 3. local FoF on owned + ghosts: y, z periodic, x open (the ghosts carry the x periodicity)
    local = np.concatenate([own_x, ghosts["x"]])
    n_loc = len(local)
    if n_loc:
        tree = cKDTree(local, boxsize=[0.0, box, box])
        pairs = tree.query_pairs(linking_length, output_type="ndarray")
        del tree
        graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n_loc, n_loc))
        n_comp, labels = connected_components(graph, directed=False)
        del graph, pairs
        labels = labels.astype(np.int64)
    else:
        n_comp, labels = 0, np.zeros(0, np.int64)
    del local
    own_lab, ghost_lab = labels[:n_own], labels[n_own:]
    offsets = np.array(comm.allgather(int(n_comp)), np.int64)
    label_offsets = np.concatenate([[0], np.cumsum(offsets)])
    off = int(label_offsets[rank])
    # 4. boundary equivalences: a ghost in a component with owned particles links that component to
    #    the component of its original on the owner rank (components of ghosts only are redundant:
    #    the ghosts are complete, so each link is also found on the owner of either end)
    has_own = np.zeros(n_comp, bool)
    has_own[own_lab] = True
    keep = has_own[ghost_lab]
    back = exchange(comm, {"src_idx": ghosts["src_idx"][keep], "lab": off + ghost_lab[keep]},
                    ghosts["src"][keep], what="fof ghost labels")
    edges = np.stack([off + own_lab[back["src_idx"]], back["lab"]], axis=1)
    edges = np.unique(edges, axis=0) if len(edges) else np.zeros((0, 2), np.int64)
    del ghosts, back
    mapped, mapped_root = _resolve_equivalences(comm, edges, label_offsets)
    # 5. partial count and unwrapped position sums per local component, from OWNED particles only
    counts = np.bincount(own_lab, minlength=n_comp)
    order = np.argsort(own_gid, kind="stable")  # reference member: smallest global index
    first = np.full(n_comp, -1, np.int64)
    first[own_lab[order[::-1]]] = order[::-1]
    root = off + np.arange(n_comp, dtype=np.int64)
    crossing = np.zeros(n_comp, bool)
    if len(mapped):
        crossing[mapped - off] = True
        root[mapped - off] = mapped_root
    send = has_own & (crossing | (counts >= min_members))
    sel = np.flatnonzero(send)
    member = np.flatnonzero(send[own_lab])  # owned particles of the groups sent (not the field)
    lab_m = np.searchsorted(sel, own_lab[member])
    d = own_x[member] - own_x[first[own_lab[member]]]
    d -= box * np.round(d / box)
    sums = np.stack([np.bincount(lab_m, weights=d[:, i], minlength=len(sel)) for i in range(3)], axis=1)
    partial = (root[sel], counts[sel].astype(np.int64), sums, own_x[first[sel]], own_gid[first[sel]])
    parts = comm.gather(partial, root=0)
    if rank != 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    h_root, h_n, h_sum, h_ref, h_gid = (np.concatenate([p[i] for p in parts]) for i in range(5))
    if len(h_root) == 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    h_sum = h_sum.reshape(-1, 3)
    h_ref = h_ref.reshape(-1, 3)
    o = np.lexsort((h_gid, h_root))  # by group, then by reference index: the group's first member first
    h_root, h_n, h_sum, h_ref = h_root[o], h_n[o], h_sum[o], h_ref[o]
    uniq, start, inv = np.unique(h_root, return_index=True, return_inverse=True)
    ref0 = h_ref[start][inv]
    shift = h_ref - ref0
    shift -= box * np.round(shift / box)
    tot = h_sum + h_n[:, None] * shift
    npart = np.bincount(inv, weights=h_n, minlength=len(uniq)).astype(np.int64)
    com = np.stack([np.bincount(inv, weights=tot[:, i], minlength=len(uniq)) for i in range(3)], axis=1)
    com = h_ref[start] + com / npart[:, None]
    keep = npart >= min_members
    com, npart = com[keep], npart[keep]
    com = np.mod(com, box) - 0.5 * box  # [0, box) frame -> [-box/2, box/2)
    com[com >= 0.5 * box] = -0.5 * box
    order = np.lexsort((com[:, 2], com[:, 1], com[:, 0], -npart))
    return com[order], npart[order]


def find_halos_distributed(comm, pos: np.ndarray, box: float, linking_length: float,
                           min_members: int, method: str = "slab") -> tuple[np.ndarray, np.ndarray]:
    """FoF over all ranks' particles (any rank may hold any particle). Rank 0 returns every halo as
    (x_com (nh, 3) float64 in [-box/2, box/2), npart (nh,) int64), sorted as :func:`find_halos`;
    the other ranks return empty arrays. Collective.

    ``method="slab"`` (default): distributed slab FoF, nothing of size O(N) on one rank.
    ``method="gather"``: the old path, positions gathered on rank 0 (refused above
    ``MAX_FOF_PARTICLES``); kept for comparison and timing.
    """
    if method == "slab":
        return _find_halos_slab(comm, pos, box, linking_length, min_members)
    if method != "gather":
        raise ValueError(f"unknown FoF method {method!r} (slab or gather)")
    n_total = comm.allreduce(len(pos))
    if n_total > MAX_FOF_PARTICLES:
        raise ValueError(f"FoF runs on one rank and accepts at most {MAX_FOF_PARTICLES} particles "
                         f"(300^3); this simulation has {n_total}. Use a smaller ppd or halos.kind=planted")
    parts = comm.gather(np.ascontiguousarray(pos, dtype=np.float32), root=0)
    if comm.rank != 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    return find_halos(np.concatenate(parts), box, linking_length, min_members)
