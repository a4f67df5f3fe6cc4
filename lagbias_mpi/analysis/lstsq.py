"""Paper I's binned least squares (numerics): (delta, lap) bins by percentile, normal equations summed
over cells with one Allreduce, the constrained solve for a piecewise-constant f >= 0 with <f> = 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.sparse
from mpi4py import MPI

from lagbias_mpi.config.lstsq import LstsqConfig
from lagbias_mpi.mpi.comm import global_sum
from lagbias_mpi.training.sampling import cell_scale, select_in_cells


def delta_edges(cfg: LstsqConfig) -> np.ndarray:
    """Edges (n_delta + 1) of the delta bins: uniform in delta_range, outer edges -inf / +inf."""
    e = np.linspace(cfg.delta_range[0], cfg.delta_range[1], cfg.n_delta + 1)
    e[0], e[-1] = -np.inf, np.inf
    return e


def _digitize(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index in [0, len(edges) - 2] (values beyond the outer edges go to the outer bins)."""
    return np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)


def _quantiles_from_hist(counts: np.ndarray, lo: float, hi: float, q: np.ndarray) -> np.ndarray:
    """Quantiles ``q`` (in [0, 1]) of a histogram of ``len(counts)`` uniform bins on [lo, hi],
    linear inside a bin. An empty histogram gives evenly spaced values."""
    total = counts.sum()
    if total == 0:
        return lo + q * (hi - lo)
    cum = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)]) / total
    x = np.linspace(lo, hi, len(counts) + 1)
    # the inverse of the piecewise-linear CDF: interp on the strictly increasing part
    keep = np.concatenate([[True], np.diff(cum) > 0])
    return np.interp(q, cum[keep], x[keep])


def lap_edges(comm, d: np.ndarray, lap: np.ndarray, cfg: LstsqConfig) -> np.ndarray:
    """Percentile edges (n_delta, n_lap + 1) of lap inside each delta bin, over all particles of all
    ranks (two reductions: min/max, then the integer histograms). Outer edges are -inf / +inf."""
    lo = comm.allreduce(float(lap.min()) if len(lap) else np.inf, op=MPI.MIN)
    hi = comm.allreduce(float(lap.max()) if len(lap) else -np.inf, op=MPI.MAX)
    if not np.isfinite(lo) or not hi > lo:
        raise ValueError("lstsq: no spread of lap over the particles; cannot bin")
    db = _digitize(d, delta_edges(cfg))
    fb = np.clip(((lap - lo) / (hi - lo) * cfg.fine_bins).astype(np.int64), 0, cfg.fine_bins - 1)
    hist = np.bincount(db * cfg.fine_bins + fb, minlength=cfg.n_delta * cfg.fine_bins).astype(np.int64)
    hist = global_sum(comm, hist).reshape(cfg.n_delta, cfg.fine_bins)
    q = np.linspace(0.0, 1.0, cfg.n_lap + 1)
    edges = np.array([_quantiles_from_hist(h, lo, hi, q) for h in hist])
    edges[:, 0], edges[:, -1] = -np.inf, np.inf
    return edges


def assign_bins(d: np.ndarray, lap: np.ndarray, d_edges: np.ndarray, l_edges: np.ndarray) -> np.ndarray:
    """Flat bin id = i_delta * n_lap + i_lap of each particle."""
    n_lap = l_edges.shape[1] - 1
    db = _digitize(d, d_edges)
    out = np.empty(len(d), dtype=np.int64)
    for i in np.unique(db):
        m = db == i
        out[m] = i * n_lap + _digitize(lap[m], l_edges[i])
    return out


@dataclass(frozen=True)
class Binning:
    """Bin edges in standardised (delta_R, lap_R); columns of the raw feature rows."""

    d_edges: np.ndarray
    l_edges: np.ndarray
    cols: tuple[int, int]

    @property
    def n_bins(self) -> int:
        return (len(self.d_edges) - 1) * (self.l_edges.shape[1] - 1)

    def bins(self, raw: np.ndarray) -> np.ndarray:
        return assign_bins(raw[:, self.cols[0]], raw[:, self.cols[1]], self.d_edges, self.l_edges)

    def to_dict(self) -> dict:
        return {"delta_edges": self.d_edges, "lap_edges": self.l_edges}


def fit_binning(comm, raw: np.ndarray, cols: tuple[int, int], cfg: LstsqConfig) -> Binning:
    d, lap = raw[:, cols[0]], raw[:, cols[1]]
    return Binning(delta_edges(cfg), lap_edges(comm, d, lap, cfg), cols)


@dataclass
class NormalEquations:
    """Per sub-sample m: AtA (m, B, B), Aty (m, B), yty (m,) (y = 1 + delta_true over the cells that
    hold particles), and the global particle count per bin (B,)."""

    AtA: np.ndarray
    Aty: np.ndarray
    yty: np.ndarray
    counts: np.ndarray

    @property
    def n_particles(self) -> int:
        return int(self.counts.sum())


def local_design(cell: np.ndarray, pid: np.ndarray, bins: np.ndarray, n_bins: int, n_cells_total: int,
                 n_part: int, frac: float, seed: int, member: int):
    """This rank's design matrix A (sparse, local cells x bins) and its sorted cell ids for one
    sub-sample (all particles of a cell must be on this rank)."""
    selected, cells, n, n_sel = select_in_cells(cell, pid, frac, seed, member)
    scale = cell_scale(n, n_sel, n_cells_total, n_part)
    row = np.searchsorted(cells, cell[selected])
    a = scipy.sparse.csr_matrix((scale[row], (row, bins[selected])), shape=(len(cells), n_bins))
    return a, cells


def normal_equations(comm, cell: np.ndarray, pid: np.ndarray, bins: np.ndarray, n_bins: int,
                     target_of_cells, n_cells_total: int, n_part: int, frac: float, seed: int,
                     members: int) -> NormalEquations:
    """Normal equations of every sub-sample member = 0..members-1, summed over ranks with one
    Allreduce. ``target_of_cells(cells) -> delta_true`` of local cells."""
    parts = []
    for m in range(members):
        a, cells = local_design(cell, pid, bins, n_bins, n_cells_total, n_part, frac, seed, m)
        y = 1.0 + (target_of_cells(cells) if len(cells) else np.zeros(0))
        parts.append(np.concatenate([(a.T @ a).toarray().ravel(), a.T @ y, [y @ y]]))
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    buf = np.concatenate([np.concatenate(parts), counts])
    tot = np.empty_like(buf)
    comm.Allreduce(buf, tot, op=MPI.SUM)
    per = n_bins * n_bins + n_bins + 1
    blocks = tot[:members * per].reshape(members, per)
    return NormalEquations(blocks[:, :n_bins * n_bins].reshape(members, n_bins, n_bins),
                           blocks[:, n_bins * n_bins:n_bins * n_bins + n_bins], blocks[:, -1].copy(),
                           np.rint(tot[members * per:]).astype(np.int64))


def solve_constrained(AtA: np.ndarray, Aty: np.ndarray, counts: np.ndarray, weight: float = 1e6) -> np.ndarray:
    """argmin_f f^T AtA f - 2 f^T Aty subject to f >= 0 and sum_b counts_b f_b / sum(counts) = 1.

    Bins without data (zero diagonal of AtA) get f = 0. Pure function (run on one rank)."""
    n = len(Aty)
    active = np.nonzero(np.diag(AtA) > 0)[0]
    f = np.zeros(n)
    if len(active) == 0:
        raise ValueError("lstsq: no bin holds a selected particle")
    G, b = AtA[np.ix_(active, active)], Aty[active]
    w = counts[active] / counts.sum()
    vals, vecs = np.linalg.eigh(0.5 * (G + G.T))
    tiny = 1e-12 * max(vals.max(), 1e-300)
    good = vals > tiny
    R = np.sqrt(vals[good])[:, None] * vecs[:, good].T
    r = (vecs[:, good].T @ b) / np.sqrt(vals[good])
    c = np.sqrt(weight * np.trace(G) / len(active))
    res = scipy.optimize.lsq_linear(np.vstack([R, c * w[None, :]]), np.concatenate([r, [c]]),
                                    bounds=(0.0, np.inf), method="bvls", tol=1e-12, max_iter=10000)
    x = np.maximum(res.x, 0.0)
    mean = float(w @ x)
    if not mean > 0:
        raise ValueError("lstsq: the constrained solution is zero everywhere")
    f[active] = x / mean
    return f


def loss_of(ne: NormalEquations, m: int, f: np.ndarray) -> float:
    """Sum over cells of (delta_model - delta_true)^2 for sub-sample m and bin values f."""
    return float(f @ ne.AtA[m] @ f - 2.0 * f @ ne.Aty[m] + ne.yty[m])


def solve_all(comm, ne: NormalEquations, weight: float) -> np.ndarray:
    """f (members, B) solved on rank 0 and broadcast."""
    f = None
    if comm.rank == 0:
        f = np.array([solve_constrained(ne.AtA[m], ne.Aty[m], ne.counts, weight) for m in range(len(ne.Aty))])
    return comm.bcast(f, root=0)


def bin_means(comm, bins: np.ndarray, values: np.ndarray, n_bins: int) -> np.ndarray:
    """Mean of ``values`` in each bin over all ranks (NaN for an empty bin): one Allreduce."""
    buf = np.concatenate([np.bincount(bins, weights=values, minlength=n_bins),
                          np.bincount(bins, minlength=n_bins).astype(np.float64)])
    tot = global_sum(comm, buf)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tot[:n_bins] / tot[n_bins:]
