"""From a loaded simulation to particles that sit on the owner of their training cell with their
features: IC features, Lagrangian routing + readout, Eulerian routing, and the true halo field.

Everything is collective over ``comm``; no rank holds a full grid or all particles.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lagbias_mpi.bias import features as feat
from lagbias_mpi.bias.routing import route_eulerian, route_lagrangian
from lagbias_mpi.core.memory import ROWS_PER_STEP
from lagbias_mpi.io.simfile import LocalSimulation, SimulationMeta
from lagbias_mpi.mesh.grid import ic_index, lattice_index, particle_id
from lagbias_mpi.mesh.paint import slab_offset
from lagbias_mpi.mpi.cells import CellOwnership

READOUT_CHUNK = ROWS_PER_STEP  # particles per step of the feature readout


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
    pos_aside: object | None = None  # handle of positions set aside on disk (``restore()``), pos None

    def restore_positions(self) -> None:
        """Read back positions set aside (:func:`featurised_particles`' ``set_aside``); else nothing."""
        if self.pos_aside is not None:
            self.pos = self.pos_aside.restore()
            self.pos_aside = None

    @property
    def n_local(self) -> int:
        return len(self.pid)


def featurised_particles(comm, sim: LocalSimulation, radii, kinds, moments=None,
                         release_loaded: bool = False, fft_dtype=np.float64, set_aside=None):
    """Route ``sim``'s particles to the owner of their IC plane and give them their standardised
    raw features (collective). Returns ``(particles, moments, own_moments)``: the (mean, std)
    arrays used to standardise (the given training ``moments``, else this box's own) and this box's
    own global moments over all IC grid points.

    The particles are routed first; then each feature column is computed on the IC grid (the FFT
    work of one column), its moments taken, read out at the particles' nearest IC grid point and
    dropped: no ``(planes, n, n, n_features)`` slab exists (36 B per IC cell less for 9 columns).
    ``release_loaded``: drop ``sim``'s loaded particle arrays once sent and its IC slab once
    transformed. Bytes per particle: raw float32 (4 per column), pid 8, pos 12 (+ f_true 4); each
    chunk's IC grid points are computed from the ids when a column is read out (no per-particle
    offset array is kept). ``set_aside``: a function that takes the routed positions and returns
    a handle to restore them (:func:`lagbias_mpi.core.spill.spill` with its directory): the
    positions then wait on disk while the columns are computed (``parts.pos`` is None and
    ``parts.pos_aside`` the handle), 12 B per particle less in the feature stage."""
    meta = sim.meta
    feat.check_scales(radii, meta.box, meta.n_ic)
    cols = {"lagr_index": sim.lagr_index, "pos": sim.pos}
    if sim.f_true is not None:
        cols["f_true"] = sim.f_true
    if release_loaded:
        sim.lagr_index = sim.pos = sim.f_true = None
    stats: list = []
    got = route_lagrangian(comm, cols, meta.ppd, meta.n_ic, stats=stats, with_ic_index=False)
    del cols
    lagr = got.pop("lagr_index")
    pos_aside = None
    if set_aside is not None:
        pos_aside = set_aside(got.pop("pos"))
        got["pos"] = None
    pid = np.empty(len(lagr), np.uint64)
    for lo in range(0, len(lagr), READOUT_CHUNK):  # int64 lattice indices of one chunk at a time
        pid[lo:lo + READOUT_CHUNK] = particle_id(lagr[lo:lo + READOUT_CHUNK], meta.ppd)
    del lagr
    n_col = len(radii) * len(kinds)
    raw = np.empty((len(pid), n_col), np.float32)
    own_mean, own_std = np.empty(n_col), np.empty(n_col)
    ic_slab = sim.ic_delta
    start, shape = sim.ic_start, ic_slab.shape
    if release_loaded:
        sim.ic_delta = None
    columns = feat.feature_columns(comm, ic_slab, meta.box, radii, kinds, dtype=fft_dtype)
    del ic_slab
    for c, column in enumerate(columns):
        own_mean[c], own_std[c] = feat.column_moments(comm, column)
        mean, std = (own_mean[c], own_std[c]) if moments is None else (moments[0][c], moments[1][c])
        flat = column.reshape(-1)
        for lo in range(0, len(pid), READOUT_CHUNK):  # the IC grid points of a chunk, from the ids
            offset = slab_offset(ic_index(lattice_index(pid[lo:lo + READOUT_CHUNK], meta.ppd), meta.ppd, meta.n_ic),
                                 start, shape)
            v = flat[offset].astype(np.float64)
            raw[lo:lo + READOUT_CHUNK, c] = (v - np.float64(mean)) / np.float64(std)
        del column, flat
    del columns
    own = (own_mean, own_std)
    used = own if moments is None else (np.asarray(moments[0], np.float64), np.asarray(moments[1], np.float64))
    parts = Particles(meta, raw, pid, got["pos"], f_true=got.get("f_true"), exchange_stats=stats,
                      pos_aside=pos_aside)
    return parts, used, own


def eulerian_route(comm, parts: Particles, n_grid: int, keep_raw: bool = True, consume: bool = True) -> Particles:
    """Send particles to the owner of their training-grid cell (sets ``cell`` and ``ownership``).

    Only what the next stages need travels: ``pid``, ``pos``, ``f_true`` (planted), the inputs
    ``parts.theta`` when set (float32) and the raw features when ``keep_raw``. With ``consume``
    ``parts`` is used up (its arrays are moved into the exchange, which cuts them as it sends);
    otherwise it is left whole. Bytes per particle:
    8 + 12 + 4 n_in (+ 4 n_raw) (+ 8 for f_true), plus the cell id (4 B below 2^31 cells)."""
    if parts.pos is None:
        raise ValueError("eulerian_route: the positions are set aside (Particles.restore_positions first)")
    cols = {"pid": parts.pid, "pos": parts.pos}
    if keep_raw:
        cols["raw"] = parts.raw
    if parts.theta is not None:
        cols["theta"] = np.asarray(parts.theta, np.float32)
    if parts.f_true is not None:
        cols["f_true"] = parts.f_true
    if consume:
        parts.pid = parts.pos = parts.raw = parts.theta = parts.f_true = None
    got, own = route_eulerian(comm, cols, n_grid, parts.meta.box, stats=parts.exchange_stats)
    return Particles(parts.meta, got.get("raw"), got["pid"], got["pos"], got["cell"], got.get("f_true"),
                     parts.exchange_stats, own, got.get("theta"))
