"""Configuration of the built-in simulation (``python -m lagbias_mpi.simulate``): frozen, validated dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lagbias_mpi.config.loader import load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "simulate_default.yaml"


PLANTED_FORMULA = ("f_true = exp(b1*nu + b2*nu^2 + c_lap*lam) / mean, nu = standardised delta_R, "
                   "lam = standardised laplacian of delta_R, delta_R = initial delta smoothed with a "
                   "Gaussian of radius R, read at idx_ic = round(lagr_index*N_ic/ppd) mod N_ic")


@dataclass(frozen=True)
class PMConfig:
    """Particle-mesh integration."""

    n_steps: int = 20  # kick-drift-kick steps, linear in a from a_ic to a_final
    nmesh: int = 0  # force mesh cells per side; 0 means 2 * ppd

    def __post_init__(self):
        if self.n_steps < 1:
            raise ValueError(f"pm.n_steps must be >= 1, got {self.n_steps}")
        if self.nmesh < 0 or self.nmesh == 1:
            raise ValueError(f"pm.nmesh must be 0 (= 2 ppd) or >= 2, got {self.nmesh}")


@dataclass(frozen=True)
class HaloFinderConfig:
    """Halo finding, or the planted truth."""

    kind: Literal["fof", "planted"] = "fof"
    linking_length: float = 0.2  # in units of the mean interparticle separation box/ppd
    min_members: int = 20
    hmf_min_npart: int = 100  # halos entering the mass-function check

    def __post_init__(self):
        if not 0 < self.linking_length < 0.5:
            raise ValueError(f"halos.linking_length must be in (0, 0.5), got {self.linking_length}")
        if self.min_members < 2:
            raise ValueError(f"halos.min_members must be >= 2, got {self.min_members}")
        if self.hmf_min_npart < self.min_members:
            raise ValueError("halos.hmf_min_npart must be >= halos.min_members")


@dataclass(frozen=True)
class PlantedConfig:
    """The analytic f_true of the planted variant (see PLANTED_FORMULA)."""

    radius: float = 2.83  # Gaussian smoothing radius R in Mpc/h
    b1: float = 1.0
    b2: float = 0.1
    c_lap: float = -0.3

    def __post_init__(self):
        if self.radius <= 0:
            raise ValueError(f"planted.radius must be > 0 Mpc/h, got {self.radius}")
        if self.b2 < 0:
            raise ValueError(f"planted.b2 must be >= 0 (else f_true has no lower tail), got {self.b2}")


@dataclass(frozen=True)
class OutputConfig:
    write_velocities: bool = False  # add /particles/vel [km/s]
    figures: bool = True  # simulate_checks.png


@dataclass(frozen=True)
class SimulateConfig:
    """Configuration of ``python -m lagbias_mpi.simulate`` (defaults = configs/simulate_default.yaml)."""

    name: str = "default"  # names the cache directory <name>-<config hash>
    cosmology: str = "AbacusSummit_base_c000_ph000"
    box: float = 200.0  # Mpc/h
    ppd: int = 128  # particles per dimension
    n_ic: int = 256  # IC grid cells per side (a multiple of ppd)
    z_ic: float = 99.0
    z_final: float = 0.5
    seed: int = 1234  # realisation i uses seed + i
    n_realisations: int = 2
    pm: PMConfig = field(default_factory=PMConfig)
    halos: HaloFinderConfig = field(default_factory=HaloFinderConfig)
    planted: PlantedConfig = field(default_factory=PlantedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}")
        if self.box <= 0:
            raise ValueError(f"box must be > 0 Mpc/h, got {self.box}")
        if self.ppd < 2:
            raise ValueError(f"ppd must be >= 2, got {self.ppd}")
        if self.n_ic < self.ppd or self.n_ic % self.ppd:
            raise ValueError(f"n_ic = {self.n_ic} must be a multiple of ppd = {self.ppd} (the lattice "
                             "must sit on IC grid points)")
        if not 0 <= self.z_final < self.z_ic:
            raise ValueError(f"z_final = {self.z_final} must be >= 0 and below z_ic = {self.z_ic}")
        if self.n_realisations < 1:
            raise ValueError(f"n_realisations must be >= 1, got {self.n_realisations}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def nmesh(self) -> int:
        """Force mesh cells per side."""
        return self.pm.nmesh or 2 * self.ppd

    @property
    def n_particles(self) -> int:
        return self.ppd**3


def load_simulate_config(path=None, overrides: list[str] | None = None) -> SimulateConfig:
    """Config from a YAML file (None: the built-in defaults, equal to configs/simulate_default.yaml)
    plus ``key=value`` overrides."""
    return load_config(SimulateConfig, path, overrides)
