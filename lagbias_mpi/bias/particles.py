"""From a loaded simulation to particles that sit on the owner of their training cell with their
features: IC features, Lagrangian routing + readout, Eulerian routing, and the true halo field.

Everything is collective over ``comm``; no rank holds a full grid or all particles.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lagbias_mpi.bias import features as feat
from lagbias_mpi.bias.routing import read_features, route_eulerian, route_lagrangian
from lagbias_mpi.io.simfile import LocalSimulation, SimulationMeta
from lagbias_mpi.mesh.grid import particle_id
from lagbias_mpi.mpi.comm import global_moments


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
        moments = global_moments(comm, raw)
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
