"""Configuration of AbacusSummit inputs: one simulation (:class:`AbacusSource`) and a training set (:class:`AbacusSet`); the reading is in :mod:`lagbias_mpi.io.abacus`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional


@dataclass(frozen=True)
class AbacusSource:
    """One AbacusSummit simulation at one redshift.

    ``abacus_root`` holds ``<sim_name>/halos/z{redshift:.3f}/`` (or ``small/<sim_name>/...``, as
    AbacusSummit lays out its small boxes); ``ic_root`` (default ``<abacus_root>/ic``, or its
    ``small/``) holds ``<sim_name>/ic_dens_N{n_ic}.asdf``, the default ``ic_file`` (with
    ``n_ic`` unset: the single, or else the smallest, ``ic_dens_N*.asdf`` there). ``halo_min_npart`` /
    ``halo_min_mass`` [Msun/h] only cut halos at read time to save memory; the true-field selection
    is the training config's. ``cleaned`` loads the CompaSO cleaning catalogues (abacusutils'
    recommendation), looked for upwards of the halo directory or in ``cleaning_dir``.
    """

    abacus_root: str
    sim_name: str
    redshift: float = 0.5
    subsamples: Literal["A", "B", "AB"] = "AB"
    cleaned: bool = True
    cleaning_dir: Optional[str] = None
    ic_root: Optional[str] = None
    ic_file: Optional[str] = None
    n_ic: Optional[int] = None
    halo_min_npart: int = 1
    halo_min_mass: Optional[float] = None

    def __post_init__(self):
        if not self.abacus_root:
            raise ValueError("abacus_root must name the directory holding the simulations")
        if not self.sim_name or "/" in self.sim_name:
            raise ValueError(f"sim_name must be a simulation directory name, got {self.sim_name!r}")
        if not self.redshift >= 0:
            raise ValueError(f"redshift must be >= 0, got {self.redshift}")
        if self.n_ic is not None and self.n_ic < 1:
            raise ValueError(f"n_ic must be >= 1, got {self.n_ic}")
        if self.halo_min_npart < 1:
            raise ValueError(f"halo_min_npart must be >= 1, got {self.halo_min_npart}")
        if self.halo_min_mass is not None and not self.halo_min_mass > 0:
            raise ValueError(f"halo_min_mass must be > 0 Msun/h, got {self.halo_min_mass}")

    @property
    def sim_dir(self) -> Path:
        """``<abacus_root>/<sim_name>``, or ``<abacus_root>/small/<sim_name>`` (AbacusSummit's
        layout of the small boxes) when only that exists."""
        return _first_dir(Path(self.abacus_root) / self.sim_name,
                          Path(self.abacus_root) / "small" / self.sim_name)

    @property
    def halo_dir(self) -> Path:
        return self.sim_dir / "halos" / f"z{self.redshift:.3f}"

    @property
    def ic_dir(self) -> Path:
        """``<ic_root>/<sim_name>``; by default ``<abacus_root>/ic/<sim_name>`` or, when only that
        exists, ``<abacus_root>/ic/small/<sim_name>``."""
        if self.ic_root is not None:
            return Path(self.ic_root) / self.sim_name
        ic = Path(self.abacus_root) / "ic"
        return _first_dir(ic / self.sim_name, ic / "small" / self.sim_name)


def _first_dir(*candidates: Path) -> Path:
    """The first existing directory of ``candidates``, else the first."""
    return next((p for p in candidates if p.is_dir()), candidates[0])


@dataclass(frozen=True)
class AbacusSet:
    """Config section for a training run on AbacusSummit: one ``abacus_root`` (and ``ic_root``),
    the training simulation and the validation simulations, with the options shared by all of them
    (see :class:`AbacusSource`)."""

    abacus_root: str
    train: str
    validate: tuple[str, ...] = ()
    redshift: float = 0.5
    subsamples: Literal["A", "B", "AB"] = "AB"
    cleaned: bool = True
    cleaning_dir: Optional[str] = None
    ic_root: Optional[str] = None
    n_ic: Optional[int] = 576
    halo_min_npart: int = 1

    def __post_init__(self):
        if self.train in self.validate:
            raise ValueError(f"{self.train} is both the training and a validation simulation")
        for name in (self.train, *self.validate):
            self.source(name)

    def source(self, sim_name: str) -> AbacusSource:
        """The :class:`AbacusSource` of one simulation of the set."""
        return AbacusSource(abacus_root=self.abacus_root, sim_name=sim_name, redshift=self.redshift,
                            subsamples=self.subsamples, cleaned=self.cleaned,
                            cleaning_dir=self.cleaning_dir, ic_root=self.ic_root, n_ic=self.n_ic,
                            halo_min_npart=self.halo_min_npart)

    def train_source(self) -> AbacusSource:
        return self.source(self.train)

    def val_sources(self) -> list[AbacusSource]:
        return [self.source(name) for name in self.validate]
