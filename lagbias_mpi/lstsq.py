"""``python -m lagbias_mpi.lstsq``: Paper I's binned least-squares f for one smoothing scale.

    mpirun -n P python -m lagbias_mpi.lstsq --config FILE.yaml [--set key=value ...] [--nn-run DIR] [--out DIR]

The (delta, lap) plane of one scale R_f is cut into ``n_delta`` bins of the standardised delta_R
(uniform in ``delta_range``, the outer bins open) and, inside each delta bin, ``n_lap`` bins at the
percentiles of lap_R of the particles in that delta bin. f is constant in each bin. With the
training sub-sampling (per cell n_sel of n particles, scale_j = N_cells / N_part * n_j / n_sel_j)
the model field is linear in the bin values,

    1 + delta_model[j] = sum_b A[j, b] f_b,   A[j, b] = scale_j * (selected particles of cell j in bin b),

so the squared error of the halo field, sum_j (A f - (1 + delta_true))_j^2, needs only the normal
equations A^T A and A^T (1 + delta_true), sums over cells: cells and their particles are local after
Eulerian routing, so every rank sums its cells and one Allreduce adds them up (all sub-samples in
the same reduction). Rank 0 solves min |A f - y|^2 with f >= 0 and sum_b N_b f_b / N = 1 (N_b: all
particles of the simulation in bin b, so that <f> = 1 over the particles) and broadcasts f.

Percentiles are approximate: a distributed histogram of lap with ``fine_bins`` bins between its global
minimum and maximum per delta bin (one Allreduce of integer counts, so the edges are identical on
any number of ranks), linearly interpolated inside a fine bin.

The constrained problem is solved with ``scipy.optimize.lsq_linear`` (method "bvls", bounds f >= 0)
on the square-root form of the normal equations, R = Lambda^{1/2} V^T with A^T A = V Lambda V^T,
plus the equality as one heavily weighted row; the result is then divided by its mean
sum_b N_b f_b / N (a relative change below ~1e-6), which keeps f >= 0 and makes <f> = 1 hold to
rounding.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.optimize
import scipy.sparse
from mpi4py import MPI

from . import analysis_plots, pipeline, sources
from .cli import add_config_arguments, run_command, write_summary
from .config import ConfigError, load_config
from .ensemble import load_ensemble, simulation_particles
from .evaluate import evaluate_simulation
from .features import feature_names
from .logs import get_logger, setup_logging
from .parallel import StageTimer, global_sum
from .sampling import select_in_cells
from .train import eval_nmesh
from .train_config import FeatureConfig, TrainRunConfig

log = get_logger("lstsq")


@dataclass(frozen=True)
class LstsqConfig:
    """Binning of the (delta, lap) plane of one scale (standardised features, units of their std)."""

    scale: Optional[float] = None  # Mpc/h; default: the single scale of features.scales
    n_delta: int = 20
    n_lap: int = 5
    delta_range: tuple[float, ...] = (-3.0, 4.0)  # inner delta edges span this; outer bins open
    fine_bins: int = 2048  # histogram bins per delta bin for the lap percentiles
    constraint_weight: float = 1e6  # weight of the <f> = 1 row relative to trace(A^T A) / n_bins

    def __post_init__(self):
        if self.n_delta < 1 or self.n_lap < 1:
            raise ValueError("lstsq.n_delta and lstsq.n_lap must be >= 1")
        if len(self.delta_range) != 2 or not self.delta_range[0] < self.delta_range[1]:
            raise ValueError(f"lstsq.delta_range must be [low, high] with low < high, got {self.delta_range}")
        if self.fine_bins < 8 * self.n_lap:
            raise ValueError("lstsq.fine_bins must be >= 8 * lstsq.n_lap")
        if not self.constraint_weight > 0:
            raise ValueError("lstsq.constraint_weight must be > 0")
        if self.scale is not None and self.scale <= 0:
            raise ValueError("lstsq.scale must be > 0 Mpc/h")

    @property
    def n_bins(self) -> int:
        return self.n_delta * self.n_lap


@dataclass(frozen=True)
class LstsqRunConfig(TrainRunConfig):
    """A training config (its sections; ``model`` is accepted and ignored) plus the ``lstsq`` section,
    with one smoothing scale of (delta, lap) by default. ``train.ensemble`` sub-samples with seeds
    (``train.seed``, member) as in training."""

    features: FeatureConfig = field(default_factory=lambda: FeatureConfig(scales="1Rf", kinds=("delta", "lap")))
    lstsq: LstsqConfig = field(default_factory=LstsqConfig)

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        radii = self.features.radii
        if self.lstsq.scale is None and len(radii) != 1:
            raise ValueError(f"lstsq works on one scale: features.scales has {len(radii)} ({radii}); "
                             "set lstsq.scale or give one scale")
        if self.lstsq.scale is not None and not any(abs(r - self.lstsq.scale) < 1e-9 for r in radii):
            raise ValueError(f"lstsq.scale {self.lstsq.scale} is not one of features.scales {radii}")

    @property
    def radius(self) -> float:
        return float(self.lstsq.scale if self.lstsq.scale is not None else self.features.radii[0])


# ---------------------------------------------------------------- binning (pure + one reduction each)

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


# ---------------------------------------------------------------- normal equations and the solve

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
    scale = (n_cells_total / n_part) * n / np.maximum(n_sel, 1)
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


# ---------------------------------------------------------------- the command

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lagbias_mpi.lstsq", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p, "config YAML (a training config + optional lstsq section)")
    p.add_argument("--nn-run", default=None,
                   help="run directory of a NN trained on the same single scale (delta, lap), for comparison")
    p.add_argument("--out", default=None,
                   help="output directory (default <nn-run>/lstsq, else runs/<run.name or config stem>/lstsq)")
    return p.parse_args(argv)


def _check_inputs(comm, cfg: LstsqRunConfig, nn_run, base_dir: Path):
    train_specs, val_specs, metas = sources.resolve_checked(comm, cfg.simulation, base_dir)
    train_spec = train_specs[0]  # least squares on the first training box
    specs = [train_spec, *val_specs]
    for spec, meta in zip(specs, [metas[0], *metas[len(train_specs):]]):
        if cfg.radius < meta.box / meta.n_ic * (1 - 1e-9):
            raise ConfigError(f"lstsq scale {cfg.radius} Mpc/h is below the IC grid spacing "
                              f"{meta.box / meta.n_ic:.4g} Mpc/h of {spec.get('path')}")
        if meta.n_ic < comm.size or eval_nmesh(cfg.grid, meta.box) < comm.size:
            raise ConfigError(f"grids of {spec.get('path')} too small for {comm.size} ranks")
    if nn_run is not None and not (Path(nn_run) / "model.pt").is_file():
        raise ConfigError(f"--nn-run {nn_run}: no model.pt there")
    return train_spec, val_specs


def run(comm, config_path, overrides=None, nn_run=None, out=None, base_dir=None) -> dict:
    """The whole lstsq command on ``comm``; returns the summary dict."""
    cfg = load_config(LstsqRunConfig, config_path, list(overrides or []))
    setup_logging(comm, cfg.run.log_level)
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    train_spec, val_specs = _check_inputs(comm, cfg, nn_run, base_dir)
    name = cfg.run.name or Path(config_path).stem
    if out is not None:
        out_dir = Path(out)
    else:
        out_dir = Path(nn_run) / "lstsq" if nn_run else base_dir / "runs" / name / "lstsq"
    timer = StageTimer(comm)
    lcfg, radius = cfg.lstsq, cfg.radius
    names = feature_names((radius,), ("delta", "lap"))
    ens = load_ensemble(nn_run) if nn_run is not None else None
    results, nn_results, fig2 = {}, {}, {}
    binning = f_bins = ne = moments = None
    for i, spec in enumerate([train_spec, *val_specs]):
        label = "train" if i == 0 else ("val" if len(val_specs) == 1 else f"val{i - 1}")
        with timer.stage("load"):
            sim = sources.load(comm, spec)
        with timer.stage("features"):
            slab, moments = pipeline.ic_features(comm, sim, (radius,), ("delta", "lap"), moments)
            parts = pipeline.lagrangian_particles(comm, sim, slab)
            del slab
        tpos, tw, what = pipeline.true_tracers(comm, sim, cfg.halos)
        if i == 0:
            with timer.stage("fit"):
                binning = fit_binning(comm, parts.raw, (0, 1), lcfg)
                n_grid = int(round(sim.meta.box / cfg.grid.cell))
                eparts = pipeline.eulerian_route(comm, parts, n_grid)
                truth = pipeline.delta_slab(comm, tpos, tw, n_grid, sim.meta.box, "ngp")
                start = pipeline.local_grid_start(comm, n_grid)
                ne = normal_equations(comm, eparts.cell, eparts.pid, binning.bins(eparts.raw), binning.n_bins,
                                      lambda c: pipeline.cell_values(truth, n_grid, start, c), n_grid**3,
                                      sim.meta.n_particles, cfg.sampling.frac, cfg.train.seed, cfg.train.ensemble)
                f_bins = solve_all(comm, ne, lcfg.constraint_weight)
                del eparts, truth
            losses = [loss_of(ne, m, f_bins[m]) for m in range(len(f_bins))]
            log.info(f"lstsq: {binning.n_bins} bins, {cfg.train.ensemble} sub-samples, {what}; loss per "
                     f"sub-sample {np.array2string(np.array(losses), precision=5)}")
        bins = binning.bins(parts.raw)
        if i == 0:
            fig2["delta_centre"] = bin_means(comm, bins, parts.raw[:, 0], binning.n_bins)
        nmesh = eval_nmesh(cfg.grid, sim.meta.box)
        with timer.stage("evaluate"):
            results[label] = evaluate_simulation(comm, f_bins[:, bins], parts.pos, tpos, tw, sim.meta.box,
                                                 nmesh, cfg.grid.kmax_lowk)
            log.info(f"evaluate {label}: lstsq P_model/P_h at k < {cfg.grid.kmax_lowk} = "
                     f"{results[label]['pk_ratio_lowk']:.4f}")
            if ens is not None:
                nparts = simulation_particles(comm, sim, ens)
                if not np.array_equal(nparts.pid, parts.pid):
                    raise RuntimeError("lstsq: NN and lstsq particles are not in the same order")
                f_nn = ens.predict_f_members(ens.inputs(nparts.raw, standardised=True))
                nn_results[label] = evaluate_simulation(comm, f_nn, nparts.pos, tpos, tw, sim.meta.box, nmesh,
                                                        cfg.grid.kmax_lowk)
                if i == 0:
                    fig2["f_nn"] = bin_means(comm, bins, f_nn.mean(axis=0), binning.n_bins)
                log.info(f"evaluate {label}: NN P_model/P_h = {nn_results[label]['pk_ratio_lowk']:.4f}")
                del nparts
        del parts, sim
    val_label = next((k for k in results if k != "train"), None)
    if comm.rank == 0 and cfg.run.figures:
        analysis_plots.plot_lstsq(binning, f_bins, fig2, results, nn_results, out_dir / "figures" / "lstsq_fig2.png",
                                  radius, cfg.grid.kmax_lowk)
    summary = {
        "n_ranks": comm.size,
        "radius": radius,
        "n_bins": binning.n_bins,
        "sub_samples": cfg.train.ensemble,
        "pk_ratio_lowk_val_lstsq": results[val_label]["pk_ratio_lowk"] if val_label else None,
        "pk_ratio_lowk_val_lstsq_members": results[val_label]["pk_ratio_lowk_members"] if val_label else None,
        "pk_ratio_lowk_train_lstsq": results["train"]["pk_ratio_lowk"],
        "pk_ratio_lowk_val_nn": nn_results[val_label]["pk_ratio_lowk"] if (val_label and nn_results) else None,
        "pk_ratio_lowk_train_nn": nn_results["train"]["pk_ratio_lowk"] if nn_results else None,
        "nn_run": str(nn_run) if nn_run else None,
        "loss_per_subsample": [loss_of(ne, m, f_bins[m]) for m in range(len(f_bins))],
        "mean_f": results["train"]["mean_f"],
        "min_f": float(f_bins.min()),
        "f_bins": f_bins.mean(axis=0),
        "f_bins_members": f_bins,
        "bin_counts": ne.counts,
        "binning": binning.to_dict(),
        "feature_names": names,
        "moments": {"mean": moments[0], "std": moments[1]},
    }
    write_summary(comm, out_dir / "summary.json", summary, timer, cfg)
    log.info(f"done: P_model/P_h low k val lstsq {summary['pk_ratio_lowk_val_lstsq']}, "
             f"NN {summary['pk_ratio_lowk_val_nn']}; outputs in {out_dir}")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD

    return run_command(comm, lambda: run(comm, args.config, args.set, args.nn_run, args.out))


if __name__ == "__main__":
    sys.exit(main())
