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
from lagbias_mpi.mesh.grid import ic_index, particle_id
from lagbias_mpi.mpi.cells import CellOwnership
from lagbias_mpi.mpi.comm import global_moments

READOUT_CHUNK = 1 << 20  # particles per step of the feature readout


@dataclass
class Particles:
    """This rank's particles of one simulation (after Lagrangian routing, then Eulerian routing).

    ``raw``: standardised raw features (n, n_raw) float32; ``pid``: global id (uint64);
    ``pos``: final position (n, 3) Mpc/h; ``cell``: global flat training-cell id and ``ownership``:
    which rank owns which cells (after Eulerian routing); ``f_true`` for planted simulations.
    """

    meta: SimulationMeta
    raw: np.ndarray
    pid: np.ndarray
    pos: np.ndarray
    cell: np.ndarray | None = None
    f_true: np.ndarray | None = None
    exchange_stats: list = field(default_factory=list)
    ownership: CellOwnership | None = None
    theta: np.ndarray | None = None  # (n, n_in) float32 orthogonalised inputs, when routed with them

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


def lagrangian_particles(comm, sim: LocalSimulation, feature_slab: np.ndarray,
                         release_loaded: bool = False) -> Particles:
    """Route ``sim``'s particles to their IC slab owner and read their features there.
    ``release_loaded``: drop ``sim``'s loaded particle arrays once they are sent (before the readout)."""
    meta = sim.meta
    cols = {"lagr_index": sim.lagr_index, "pos": sim.pos}
    if sim.f_true is not None:
        cols["f_true"] = sim.f_true
    if release_loaded:
        sim.lagr_index = sim.pos = sim.f_true = None
    stats: list = []
    got = route_lagrangian(comm, cols, meta.ppd, meta.n_ic, stats=stats, with_ic_index=False)
    del cols
    lagr = got.pop("lagr_index")
    raw = np.empty((len(lagr), feature_slab.shape[-1]), feature_slab.dtype)
    for lo in range(0, len(lagr), READOUT_CHUNK):  # IC grid points a chunk at a time (24 B each)
        idx = ic_index(lagr[lo:lo + READOUT_CHUNK], meta.ppd, meta.n_ic)
        raw[lo:lo + READOUT_CHUNK] = read_features(feature_slab, sim.ic_start, idx)
    pid = particle_id(lagr, meta.ppd)
    del lagr
    return Particles(meta, raw, pid, got["pos"], f_true=got.get("f_true"), exchange_stats=stats)


def eulerian_route(comm, parts: Particles, n_grid: int, theta: np.ndarray | None = None,
                   keep_raw: bool = True) -> Particles:
    """Send particles to the owner of their training-grid cell (sets ``cell`` and ``ownership``).

    Only what the next stages need travels: ``pid``, ``pos``, ``f_true`` (planted), the inputs
    ``theta`` when given (float32; then ``theta`` is set) and the raw features when ``keep_raw``.
    Bytes per particle: 8 + 12 + 4 n_in (+ 4 n_raw) (+ 8 for f_true), plus the 8 B cell id."""
    cols = {"pid": parts.pid, "pos": parts.pos}
    if keep_raw:
        cols["raw"] = parts.raw
    if theta is not None:
        cols["theta"] = np.asarray(theta, np.float32)
    if parts.f_true is not None:
        cols["f_true"] = parts.f_true
    got, own = route_eulerian(comm, cols, n_grid, parts.meta.box, stats=parts.exchange_stats)
    return Particles(parts.meta, got.get("raw"), got["pid"], got["pos"], got["cell"], got.get("f_true"),
                     parts.exchange_stats, own, got.get("theta"))
