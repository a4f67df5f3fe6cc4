"""From a loaded simulation to particles that sit on the owner of their training cell with their
features: IC features, Lagrangian routing + readout, Eulerian routing, and the true halo field.

Everything is collective over ``comm``; no rank holds a full grid or all particles.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import features as feat
from .layout import slab_bounds
from .paint import paint
from .parallel import global_sum
from .routing import particle_id, read_features, route_eulerian, route_lagrangian
from .simdata import LocalSimulation, SimulationMeta


@dataclass
class Particles:
    """This rank's particles of one simulation (after Lagrangian routing, then Eulerian routing).

    ``raw``: standardised raw features (n, n_raw) float64; ``pid``: global id (uint64);
    ``pos``: final position (n, 3) Mpc/h; ``cell``: global flat training-cell id (after Eulerian
    routing); ``f_true`` for planted simulations.
    """

    meta: SimulationMeta
    raw: np.ndarray
    pid: np.ndarray
    pos: np.ndarray
    cell: np.ndarray | None = None
    f_true: np.ndarray | None = None
    exchange_stats: list = field(default_factory=list)

    @property
    def n_local(self) -> int:
        return len(self.pid)


def ic_features(comm, sim: LocalSimulation, radii, kinds, moments=None):
    """Standardised feature slab of ``sim``'s IC grid and the moments used (the given ``moments``
    (mean, std) of the training simulation, or this simulation's global moments)."""
    feat.check_scales(radii, sim.meta.box, sim.meta.n_ic)
    raw = feat.compute_features(comm, sim.ic_delta, sim.meta.box, radii, kinds)
    if moments is None:
        moments = feat.global_moments(comm, raw)
    return feat.standardise(raw, *moments), moments


def lagrangian_particles(comm, sim: LocalSimulation, feature_slab: np.ndarray) -> Particles:
    """Route ``sim``'s particles to their IC slab owner and read their features there."""
    meta = sim.meta
    cols = {"lagr_index": sim.lagr_index, "pos": sim.pos}
    if sim.f_true is not None:
        cols["f_true"] = sim.f_true
    stats: list = []
    got = route_lagrangian(comm, cols, meta.ppd, meta.n_ic, stats=stats)
    raw = read_features(feature_slab, sim.ic_start, got["ic_index"]).astype(np.float64)
    return Particles(meta, raw, particle_id(got["lagr_index"], meta.ppd), got["pos"],
                     f_true=got.get("f_true"), exchange_stats=stats)


def eulerian_route(comm, parts: Particles, n_grid: int) -> Particles:
    """Send particles to the owner of their training-grid cell plane (sets ``cell``)."""
    cols = {"raw": parts.raw, "pid": parts.pid, "pos": parts.pos}
    if parts.f_true is not None:
        cols["f_true"] = parts.f_true
    got = route_eulerian(comm, cols, n_grid, parts.meta.box, stats=parts.exchange_stats)
    return Particles(parts.meta, got["raw"], got["pid"], got["pos"], got["cell"], got.get("f_true"),
                     parts.exchange_stats)


def select_halos(sim: LocalSimulation, halo_cfg) -> tuple[np.ndarray, np.ndarray]:
    """(positions, weights) of this rank's halos in the selection (mass- or number-weighted)."""
    npart = sim.halo_npart.astype(np.int64)
    mass = npart * sim.meta.particle_mass
    keep = np.ones(len(npart), dtype=bool)
    if halo_cfg.min_npart is not None:
        keep &= npart >= halo_cfg.min_npart
    if halo_cfg.max_npart is not None:
        keep &= npart < halo_cfg.max_npart
    if halo_cfg.min_mass is not None:
        keep &= mass >= halo_cfg.min_mass
    if halo_cfg.max_mass is not None:
        keep &= mass < halo_cfg.max_mass
    weight = npart[keep].astype(np.float64) if halo_cfg.weighting == "mass" else np.ones(int(keep.sum()))
    return sim.halo_pos[keep], weight


def true_tracers(comm, sim: LocalSimulation, halo_cfg) -> tuple[np.ndarray, np.ndarray, str]:
    """(positions, weights, description) of the true field's tracers on this rank: planted
    particles weighted by f_true, else the selected halos. Refuses an empty selection."""
    if sim.meta.kind == "planted":
        if sim.f_true is None:
            raise ValueError(f"{sim.meta.source}: planted simulation without f_true")
        pos, w, what = sim.pos, sim.f_true.astype(np.float64), "planted f_true"
    else:
        pos, w = select_halos(sim, halo_cfg)
        what = f"{int(global_sum(comm, np.int64(len(w))))} halos ({halo_cfg.weighting}-weighted)"
    if float(global_sum(comm, w.sum())) <= 0:
        raise ValueError(f"{sim.meta.source}: the halo selection is empty (check halos.min_npart / "
                         f"min_mass; the particle mass is {sim.meta.particle_mass:.3g} Msun/h)")
    return pos, w, what


def delta_slab(comm, pos, weight, n: int, box: float, method: str) -> np.ndarray:
    """Overdensity slab 1 + delta = N_cells w / sum(w), minus 1, of weighted tracers."""
    grid = paint(comm, pos, weight, n, box, method=method)
    total = float(global_sum(comm, np.asarray(weight, np.float64).sum()))
    return grid * (float(n) ** 3 / total) - 1.0


def cell_values(slab: np.ndarray, n: int, start: int, cells: np.ndarray) -> np.ndarray:
    """Values of a local slab at global flat cell ids (all in this rank's planes)."""
    ix, rem = np.divmod(cells, n * n)
    iy, iz = np.divmod(rem, n)
    return slab[ix - start, iy, iz]


def local_grid_start(comm, n: int) -> int:
    return slab_bounds(n, comm.size, comm.rank)[0]
