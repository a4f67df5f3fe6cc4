"""Prepared simulations for training and evaluation: load, features, Lagrangian and Eulerian routing, orthogonaliser, true field.
"""
from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
from mpi4py import MPI

from lagbias_mpi.bias.features import feature_names
from lagbias_mpi.bias.orthogonalise import DENSITY_KINDS, fit as fit_orthogonaliser
from lagbias_mpi.bias.particles import eulerian_route, featurised_particles
from lagbias_mpi.bias.routing import slab_to_owners
from lagbias_mpi.bias.truth import delta_slab, true_tracers
from lagbias_mpi.config.loader import ConfigError
from lagbias_mpi.config.train import TrainRunConfig
from lagbias_mpi.core.arrays import shrink_rows
from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.core.memory import ROWS_PER_STEP
from lagbias_mpi.core.spill import spill, spiller
from lagbias_mpi.io import sources
from lagbias_mpi.io.simfile import SimulationFileError
from lagbias_mpi.mpi.comm import global_sum

log = get_logger("train")


def validate_inputs(comm, cfg: TrainRunConfig, base_dir: Path):
    """Resolve the simulations and check what can be checked before any heavy work."""
    train_specs, val_specs, metas = sources.resolve_checked(comm, cfg.simulation, base_dir)
    radii = cfg.features.radii
    for spec, meta in zip([*train_specs, *val_specs], metas):
        cell = meta.box / meta.n_ic
        if min(radii) < cell * (1 - 1e-9):
            raise ConfigError(f"features.scales: smoothing scale {min(radii)} Mpc/h is below the IC grid "
                              f"spacing {cell:.4g} Mpc/h of {spec.get('path')}")
        n_grid = int(round(meta.box / cfg.grid.cell))
        if n_grid < 1:
            raise ConfigError(f"grid.cell {cfg.grid.cell} is larger than the box {meta.box}")
        if meta.n_ic < comm.size:
            raise ConfigError(f"IC grid {meta.n_ic}^3 cannot be cut into {comm.size} slabs")
        if eval_nmesh(cfg.grid, meta.box) < comm.size:
            raise ConfigError(f"evaluation grid smaller than the number of ranks {comm.size}")
    return train_specs, val_specs


def eval_nmesh(grid, box: float) -> int:
    """Cells per side of the CIC evaluation grid of a ``grid`` config section for a box in Mpc/h."""
    return grid.eval_nmesh if grid.eval_nmesh is not None else max(int(round(box / grid.eval_cell)), 2)


class _Sim:
    """A prepared simulation: particles on their training cell's owner, the true field at the cells
    this rank owns (``truth``: 1-d over the range ``parts.ownership.bounds(rank)``), tracers."""

    def __init__(self, label, role, spec, sim, parts, theta, truth, n_grid, tracers):
        self.label, self.role, self.spec, self.sim = label, role, spec, sim
        self.parts, self.theta, self.truth, self.n_grid = parts, theta, truth, n_grid
        self.tracers = tracers
        self._tracers_are_particles = False

    @property
    def ownership(self):
        return self.parts.ownership

    def set_positions_aside(self, directory, rank: int) -> None:
        """Write the particles' final positions (12 B per particle) to ``directory`` and drop them
        (and the planted tracers' positions, the same array) until :meth:`restore_positions`:
        training does not use them (the cells are known). The handle is ``parts.pos_aside``."""
        if self.parts.pos is None:
            return
        self._tracers_are_particles = self.tracers[0] is self.parts.pos
        self.parts.pos_aside = spill(self.parts.pos, directory, f"{self.label}_pos", rank)
        self.parts.pos = None
        if self._tracers_are_particles:
            self.tracers = (None, self.tracers[1])

    def restore_positions(self) -> None:
        """Read back the positions set aside (:meth:`Particles.restore_positions`), the planted
        tracers' with them; nothing if none are."""
        self.parts.restore_positions()
        if self._tracers_are_particles:
            self.tracers = (self.parts.pos, self.tracers[1])

    def drop_spilled(self) -> None:
        """Remove the file of positions set aside (a run that stops before evaluating)."""
        if self.parts.pos_aside is not None:
            self.parts.pos_aside.drop()
            self.parts.pos_aside = None

    def targets(self, comm):
        return lambda cells: self.ownership.local_values(self.truth, comm.rank, cells)


def sim_labels(n_train: int, n_val: int) -> list[str]:
    """Labels of the prepared simulations: ``train`` (``train0``, ``train1``, ... for several
    training boxes), then ``val`` (``val0``, ``val1``, ... for several)."""
    tr = ["train"] if n_train == 1 else [f"train{i}" for i in range(n_train)]
    return tr + (["val"] if n_val == 1 else [f"val{i}" for i in range(n_val)])


THETA_CHUNK = ROWS_PER_STEP  # particles per step of the orthogonaliser (bounds its float64 temporaries)


def apply_orthogonaliser(orth, raw: np.ndarray, chunk: int = THETA_CHUNK) -> np.ndarray:
    """theta = orth(raw) as float32, computed in chunks (float64 arithmetic inside a chunk only)."""
    return theta_of_raw(orth, {"raw": raw}, chunk, consume=False)


def theta_of_raw(orth, holder: dict, chunk: int = THETA_CHUNK, consume: bool = True) -> np.ndarray:
    """theta = orth(holder["raw"]) as float32, in chunks from the end; with ``consume`` the raw
    array is taken out of ``holder`` and cut as theta fills (:func:`~lagbias_mpi.core.arrays.shrink_rows`),
    so that raw (4 n_raw B per particle) and theta (4 n_in B) are not both whole at any time."""
    hold = {"raw": holder.pop("raw") if consume else holder["raw"]}
    n = len(hold["raw"])
    out = np.empty((n, orth.matrix.shape[0]), np.float32)
    for hi in range(n, 0, -chunk):
        lo = max(hi - chunk, 0)
        out[lo:hi] = orth.apply(hold["raw"][lo:hi])
        if consume:
            shrink_rows(hold, "raw", lo)
    return out


def _load_lagrangian(comm, timer, cfg, spec, moments, names, label, scratch=None):
    """Load one box, compute its features and route its particles to their Lagrangian slab; the
    loaded particle arrays and the IC slab are freed. Returns (sim, particles, moments). With a
    ``scratch`` directory the routed positions wait there until the Eulerian routing."""
    with timer.stage("load"):
        log.info(f"load: {sources.spec_name(spec)} ({spec.get('path', spec['kind'])})")
        sim = sources.load(comm, spec)
    with timer.stage("features"):
        log.info(f"features: {sim.meta.n_particles} particles to their Lagrangian slab, "
                 f"{len(names)} columns on the {sim.meta.n_ic}^3 IC grid read out one at a time")
        set_aside = None if scratch is None else spiller(scratch, f"{label}_routed_pos", comm.rank)
        parts, mom, _ = featurised_particles(comm, sim, cfg.features.radii, cfg.features.kinds, moments,
                                             release_loaded=True, fft_dtype=cfg.features.fft_dtype,
                                             set_aside=set_aside)
        gc.collect()  # the FFT objects hold reference cycles: free their work arrays now
    sim.ic_delta = sim.pos = sim.lagr_index = sim.f_true = None  # routed copies live in ``parts``
    return sim, parts, mom


def _finish(comm, timer, cfg, sim, parts, spec, label, role, orth, exch, keep_raw) -> _Sim:
    """Eulerian routing of one box's particles with their inputs theta, and its true field at the
    owned cells."""
    with timer.stage("routing"):
        n_grid = int(round(sim.meta.box / cfg.grid.cell))
        if keep_raw:
            parts.theta = apply_orthogonaliser(orth, parts.raw)
        else:  # raw is cut as theta fills: 4 n_in B per particle instead of 4 (n_raw + n_in)
            hold = {"raw": parts.raw}
            parts.raw = None
            parts.theta = theta_of_raw(orth, hold)
            del hold
        parts.restore_positions()  # when set aside in the feature stage: back for the routing
        eparts = eulerian_route(comm, parts, n_grid, keep_raw=keep_raw)
        del parts
        tpos, tw, what = true_tracers(comm, sim, cfg.halos, particles=(eparts.pos, eparts.f_true))
        truth = slab_to_owners(comm, delta_slab(comm, tpos, tw, n_grid, sim.meta.box, "ngp"), n_grid,
                               eparts.ownership)
        n_glob = int(global_sum(comm, np.int64(eparts.n_local)))
        if n_glob != sim.meta.n_particles:
            raise SimulationFileError(f"{spec.get('path')}: {n_glob} particles loaded, meta says "
                                      f"{sim.meta.n_particles}")
        log.info(f"{label}: {n_glob} particles, training grid {n_grid}^3, true field: {what}")
        for kind, st in eparts.exchange_stats:
            exch.setdefault(f"{label}_{kind}", []).append(st)
    return _Sim(label, role, spec, sim, eparts, eparts.theta, truth, n_grid, (tpos, tw))


def prepare_training(comm, timer, cfg, train_specs, exch, keep_raw: bool = False, scratch=None):
    """Load, featurise and route the training simulations (collective); returns (prepared
    simulations, orthogonaliser, standardisation moments, raw feature names).

    The standardisation moments are those of the first training box; the orthogonaliser is fitted
    on the particles of all training boxes together. ``keep_raw``: the prepared particles keep
    their raw features (``parts.raw``; 4 B per feature per particle more). ``scratch``: a directory
    where each rank sets its particles' positions aside from the feature stage to the Eulerian
    routing (12 B per particle less; None: they stay in memory)."""
    train_specs = list(train_specs)
    names = feature_names(cfg.features.radii, cfg.features.kinds)
    labels = sim_labels(len(train_specs), 0)
    loaded, moments = [], None
    for spec, label in zip(train_specs, labels):
        sim, parts, moments = _load_lagrangian(comm, timer, cfg, spec, moments, names, label, scratch)
        loaded.append((sim, parts))
    log.info(f"features: raw columns {names}")
    with timer.stage("orthogonalise"):
        raw = loaded[0][1].raw if len(loaded) == 1 else np.concatenate([p.raw for _, p in loaded])
        n_dens = sum(1 for n in names if n.split("_R")[0] in DENSITY_KINDS)
        orth = fit_orthogonaliser(comm, raw, names, len(cfg.features.radii),
                                  cfg.features.n_density_components(n_dens))
        del raw
        log.info(f"orthogonalise: {orth.matrix.shape[1]} raw -> {orth.matrix.shape[0]} inputs, "
                 f"eigenvalues {np.array2string(orth.eigenvalues, precision=3)}")
    prepared = []
    for i, spec in enumerate(train_specs):
        sim, parts = loaded[i]
        loaded[i] = None
        prepared.append(_finish(comm, timer, cfg, sim, parts, spec, labels[i], "train", orth, exch, keep_raw))
        del sim, parts
    return prepared, orth, moments, names


def prepare_simulation(comm, timer, cfg, spec, label, orth, moments, exch, role="val",
                       keep_raw: bool = False, scratch=None) -> _Sim:
    """Load, featurise (with the training ``moments``) and route one further simulation, with the
    training ``orth`` (collective); nothing of other boxes is needed. ``scratch``: as
    :func:`prepare_training`."""
    names = feature_names(cfg.features.radii, cfg.features.kinds)
    sim, parts, _ = _load_lagrangian(comm, timer, cfg, spec, moments, names, label, scratch)
    return _finish(comm, timer, cfg, sim, parts, spec, label, role, orth, exch, keep_raw)


def prepare_simulations(comm, timer, cfg, train_specs, val_specs, exch, keep_raw: bool = False):
    """All training then validation simulations prepared and alive together (collective): for
    commands that need them at once (pca). ``train`` prepares the validation boxes one at a time."""
    prepared, orth, moments, names = prepare_training(comm, timer, cfg, train_specs, exch, keep_raw)
    labels = sim_labels(len(list(train_specs)), len(val_specs))[len(prepared):]
    for spec, label in zip(val_specs, labels):
        prepared.append(prepare_simulation(comm, timer, cfg, spec, label, orth, moments, exch, keep_raw=keep_raw))
    return prepared, orth, moments, names


def _exchange_summary(comm, exch) -> dict:
    out = {}
    for key, stats in exch.items():
        sent = sum(s.bytes_sent for s in stats)
        out[key] = {"bytes_sum": int(global_sum(comm, np.int64(sent))), "bytes_max": comm.allreduce(sent, op=MPI.MAX),
                    "n_particles": stats[0].n_global}
    return out
