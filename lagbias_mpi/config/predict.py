"""Configuration of ``python -m lagbias_mpi.predict``: which simulation to populate with a trained
model, and what to write (docs/predict.md).

Every key can be overridden on the command line by its dotted name (``--set output.nmesh=256``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lagbias_mpi.config.abacus import AbacusSet, AbacusSource
from lagbias_mpi.config.loader import load_config
from lagbias_mpi.config.train import HaloConfig, SimulationConfig


@dataclass(frozen=True)
class PredictSimulationConfig:
    """The one simulation to predict, from the same sources as training; exactly one of:
    ``simulate`` (a simulate config YAML, with ``simulate_set`` overrides, generated into
    ``cache_dir`` when missing) and its ``realisation``; ``file`` (a lagbias_mpi simulation file);
    ``abacus`` (one AbacusSummit simulation, :class:`~lagbias_mpi.config.abacus.AbacusSource`)."""

    simulate: str | None = None
    simulate_set: tuple[str, ...] = ()
    cache_dir: str | None = None
    realisation: int = 0
    file: str | None = None
    abacus: AbacusSource | None = None

    def __post_init__(self):
        given = [self.simulate is not None, self.file is not None, self.abacus is not None]
        if sum(given) != 1:
            raise ValueError("simulation: give exactly one of simulate (a simulate config), file "
                             "(a simulation file) or abacus (one AbacusSummit simulation)")
        if self.realisation < 0:
            raise ValueError(f"simulation.realisation must be >= 0, got {self.realisation}")
        if self.simulate is None and (self.simulate_set or self.realisation):
            raise ValueError("simulation.simulate_set and simulation.realisation need simulation.simulate")

    def as_training_section(self) -> SimulationConfig:
        """The same source as a training ``simulation`` section whose (only) training simulation is
        this one, so that :func:`lagbias_mpi.io.sources.resolve_checked` resolves it."""
        if self.simulate is not None:
            return SimulationConfig(simulate=self.simulate, simulate_set=self.simulate_set,
                                    cache_dir=self.cache_dir, train_realisation=self.realisation,
                                    val_realisations=())
        if self.file is not None:
            return SimulationConfig(train_files=(self.file,))
        a = self.abacus
        if a.ic_file is not None or a.halo_min_mass is not None:
            raise ValueError("simulation.abacus: ic_file and halo_min_mass are not supported by predict; "
                             "use n_ic and halo_min_npart")
        return SimulationConfig(abacus=AbacusSet(
            abacus_root=a.abacus_root, train=a.sim_name, redshift=a.redshift, subsamples=a.subsamples,
            cleaned=a.cleaned, cleaning_dir=a.cleaning_dir, ic_root=a.ic_root, n_ic=a.n_ic,
            halo_min_npart=a.halo_min_npart))


@dataclass(frozen=True)
class OutputConfig:
    """What to write into ``RUN_DIR/predict/<name>/``.

    ``nmesh``: cells per side of ``model_field.h5`` and of the spectra (default: the training
    config's evaluation grid rule, ``grid.eval_nmesh`` or box / ``grid.eval_cell``);
    ``assignment``: ``cic`` (default) or ``ngp`` painting of the model field; ``particle_f``: also
    write ``particles_f.h5`` (particle id and f); ``members``: also each member's f (in
    particles_f.h5) and spectra; ``compare``: spectra against the true halo field ``auto`` (when the
    simulation has halos), ``require`` (refuse a simulation without), ``off``; ``kmax`` [h/Mpc]:
    the low-k figures average the bins below it (default the training's ``grid.kmax_lowk``)."""

    name: str | None = None
    nmesh: int | None = None
    assignment: Literal["cic", "ngp"] = "cic"
    particle_f: bool = False
    members: bool = False
    compare: Literal["auto", "require", "off"] = "auto"
    kmax: float | None = None
    figures: bool = True

    def __post_init__(self):
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ValueError(f"output.name must be a plain directory name, got {self.name!r}")
        if self.nmesh is not None and self.nmesh < 2:
            raise ValueError(f"output.nmesh must be >= 2, got {self.nmesh}")
        if self.kmax is not None and not self.kmax > 0:
            raise ValueError(f"output.kmax must be > 0 h/Mpc, got {self.kmax}")


@dataclass(frozen=True)
class ChecksConfig:
    """``moment_tolerance``: warn when a feature's mean or standard deviation on the new box differs
    from the training moments by more than this (mean difference in training standard deviations,
    relative difference of the standard deviation); the model always uses the training moments."""

    moment_tolerance: float = 0.05

    def __post_init__(self):
        if not self.moment_tolerance > 0:
            raise ValueError(f"checks.moment_tolerance must be > 0, got {self.moment_tolerance}")


@dataclass(frozen=True)
class PredictRunSection:
    log_level: str = "INFO"


@dataclass(frozen=True)
class PredictConfig:
    """``halos``: the true-field selection for the comparison (default: the training run's)."""

    simulation: PredictSimulationConfig
    output: OutputConfig = field(default_factory=OutputConfig)
    halos: HaloConfig | None = None
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    run: PredictRunSection = field(default_factory=PredictRunSection)


def load_predict_config(path, overrides=None) -> PredictConfig:
    """Validated predict config from YAML + ``key=value`` overrides."""
    return load_config(PredictConfig, path, list(overrides or []))
