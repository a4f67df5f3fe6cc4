"""Where simulations come from: one small dispatch so that new sources (AbacusSummit) slot in.

A *spec* is ``{"kind": "file", "path": ...}`` (a lagbias_mpi HDF5 simulation, e.g. one written by
the built-in simulation) or ``{"kind": "abacus", "source": AbacusSource, "path": ...}``. :func:`resolve` turns the ``simulation`` section of a training config into
the training spec and the validation specs, generating built-in simulations when they are missing;
:func:`load` reads one spec into a :class:`~lagbias_mpi.io.simfile.LocalSimulation`. Specs are checked
on rank 0 only (:func:`check_all`), a failure raised on every rank.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lagbias_mpi.io.simfile import (
    LocalSimulation,
    SimulationFileError,
    load_simulation,
    read_meta,
)
from lagbias_mpi.mpi.root import on_root

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def file_spec(path) -> dict:
    return {"kind": "file", "path": str(path)}


def abacus_spec(source) -> dict:
    return {"kind": "abacus", "source": source, "path": str(source.sim_dir)}


def check(spec: dict):
    """Cheap check that a spec can be loaded (file present and readable); returns its metadata."""
    if spec["kind"] == "file":
        return read_meta(spec["path"])
    if spec["kind"] == "abacus":
        from lagbias_mpi.io.abacus import abacus_meta
        from lagbias_mpi.io.abacus_files import validate_abacus_source

        return abacus_meta(validate_abacus_source(spec["source"]))
    raise SimulationFileError(f"unknown simulation source kind {spec['kind']!r}")


def check_all(comm, specs: list[dict]) -> list:
    """:func:`check` of every spec on rank 0 only (AbacusSummit: hundreds of file headers per box),
    the metadata broadcast (collective). A failed check raises the same exception (type and message)
    on every rank."""
    return on_root(comm, lambda: [check(spec) for spec in specs])


def load(comm, spec: dict) -> LocalSimulation:
    """Load one simulation spec (collective)."""
    if spec["kind"] == "file":
        return load_simulation(comm, spec["path"])
    if spec["kind"] == "abacus":
        from lagbias_mpi.io.abacus import load_abacus

        return load_abacus(comm, spec["source"])
    raise SimulationFileError(f"unknown simulation source kind {spec['kind']!r}")


def resolve(comm, sim_cfg, base_dir: Path | None = None) -> tuple[dict, list[dict]]:
    """(first training spec, validation specs) of a :class:`SimulationConfig` (collective when it has
    to generate built-in simulations). Relative paths are taken from ``base_dir`` (default: the
    project root). :func:`resolve_training` gives all training specs."""
    train, val = resolve_training(comm, sim_cfg, base_dir)
    return train[0], val


def resolve_training(comm, sim_cfg, base_dir: Path | None = None) -> tuple[list[dict], list[dict]]:
    """(training specs, validation specs) of a :class:`SimulationConfig`, as :func:`resolve`; more
    than one training spec with several ``train_files`` or ``train_realisations``."""
    train, val, _ = resolve_checked(comm, sim_cfg, base_dir)
    return train, val


def resolve_checked(comm, sim_cfg, base_dir: Path | None = None) -> tuple[list[dict], list[dict], list]:
    """:func:`resolve_training` plus the metadata of every spec (training then validation), read
    once on rank 0 by :func:`check_all`."""
    base = Path(base_dir) if base_dir is not None else PROJECT_ROOT

    def absolute(p):
        p = Path(p)
        return p if p.is_absolute() else base / p

    if sim_cfg.abacus is not None:
        ab = sim_cfg.abacus
        ab = replace(ab, abacus_root=str(absolute(ab.abacus_root)),
                     ic_root=None if ab.ic_root is None else str(absolute(ab.ic_root)),
                     cleaning_dir=None if ab.cleaning_dir is None else str(absolute(ab.cleaning_dir)))
        train = [abacus_spec(ab.train_source())]
        val = [abacus_spec(s) for s in ab.val_sources()]
    elif sim_cfg.simulate is None:
        train = [file_spec(absolute(p)) for p in sim_cfg.train_files]
        val = [file_spec(absolute(p)) for p in sim_cfg.val_files]
    else:
        from lagbias_mpi.config.simulate import load_simulate_config
        from lagbias_mpi.nbody.run import ensure_simulations

        cfg_path = absolute(sim_cfg.simulate)
        if not cfg_path.is_file():
            raise SimulationFileError(f"simulation.simulate: config file not found: {cfg_path}")
        scfg = load_simulate_config(cfg_path, list(sim_cfg.simulate_set))
        cache = absolute(sim_cfg.cache_dir) if sim_cfg.cache_dir else PROJECT_ROOT / "data" / "sims"
        paths = ensure_simulations(comm, scfg, cache)
        need = [*sim_cfg.training_realisations, *sim_cfg.val_realisations]
        if max(need) >= len(paths):
            raise SimulationFileError(f"simulation: realisation {max(need)} requested but the simulate "
                                      f"config gives {len(paths)} realisation(s)")
        train = [file_spec(paths[r]) for r in sim_cfg.training_realisations]
        val = [file_spec(paths[r]) for r in sim_cfg.val_realisations]
    return train, val, check_all(comm, [*train, *val])


def spec_name(spec: dict) -> str:
    """Short label of a spec for logs and tables."""
    if spec["kind"] == "abacus":
        return spec["source"].sim_name
    return Path(spec.get("path", spec.get("kind", "sim"))).stem
