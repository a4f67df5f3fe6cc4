"""The size of a training problem (box, particles, grids, halos) from a training config, for the planner.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

from lagbias_mpi.config.loader import apply_overrides, load_yaml
from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.training.sampling import n_batches_for, resolve_frac

log = get_logger("plan")


@dataclass(frozen=True)
class ProblemSize:
    """The sizes that drive memory and time (all global)."""

    box: float  # Mpc/h
    ppd: int  # particles per dimension of the full lattice
    n_ic: int  # IC grid cells per side
    n_particles: int  # particles loaded per simulation (after AbacusSummit sub-sampling)
    n_scales: int
    n_kinds: int
    train_nmesh: int  # training grid cells per side
    eval_nmesh: int  # evaluation grid cells per side
    frac: float  # selected fraction per training cell
    batch_size: int  # selected particles per batch
    epochs: int
    ensemble: int
    width: int
    depth: int
    n_val: int  # validation simulations (same size as the training one)
    n_halos: int
    source: str  # builtin | file | abacus
    fft_precision: str = "float64"  # features.fft_precision
    density_components: object = "paper"  # features.density_components (paper, all or a number)
    polish_evaluations: int = 0  # train.polish.evaluations (the full-batch phase per member)
    kspace_refresh_steps: int = 0  # train.kspace_loss.refresh_steps (0: the Fourier-space loss is off)
    kspace_in_epochs: bool = True  # train.kspace_loss.in_epochs (false: in the full-batch phase only)

    @property
    def n_raw(self) -> int:
        return self.n_scales * self.n_kinds

    @property
    def n_inputs(self) -> int:
        if self.n_kinds != 3 or self.density_components == "all":
            return self.n_raw
        dens = self.n_scales + 1 if self.density_components == "paper" else int(self.density_components)
        return min(dens, 2 * self.n_scales) + self.n_scales

    @property
    def n_selected(self) -> int:
        """Selected training particles: max(int(frac n), 1) per occupied cell (mean occupancy)."""
        cells = self.train_nmesh**3
        occ = self.n_particles / cells
        occupied = cells * (1.0 - math.exp(-occ))
        return int(max(self.frac * self.n_particles, min(occupied, self.n_particles)))

    @property
    def n_batches(self) -> int:
        """Batches per epoch (as :func:`lagbias_mpi.training.sampling.n_batches_for`)."""
        return n_batches_for(self.n_selected, self.batch_size)

    @property
    def kspace_refreshes_per_epoch(self) -> int:
        """Fourier-space loss coefficients computed per epoch (0 when the loss is off)."""
        if not (self.kspace_refresh_steps and self.kspace_in_epochs):
            return 0
        return -(-self.n_batches // self.kspace_refresh_steps)


ABACUS_SUBSAMPLE_FRACTION = {"A": 0.03, "B": 0.07, "AB": 0.10}


# AbacusSummit box classes (box in Mpc/h, particles per dimension), from the simulation headers
ABACUS_CLASSES = {"base": (2000.0, 6912), "small": (500.0, 1728), "highbase": (1000.0, 3456),
                  "hugebase": (2000.0, 2304), "huge": (7500.0, 8640)}


@functools.lru_cache(maxsize=32)
def _abacus_header(sim_name: str, redshift: float) -> dict:
    """BoxSize and particles per dimension of an AbacusSummit simulation: from its class in the
    name (AbacusSummit_<class>_c<cosm>_ph<phase>), else from the abacusutils metadata (slow)."""
    parts = str(sim_name).split("_")
    if len(parts) >= 2 and parts[0] == "AbacusSummit" and parts[1] in ABACUS_CLASSES:
        box, ppd = ABACUS_CLASSES[parts[1]]
        return {"box": box, "ppd": ppd}
    try:
        from abacusnbody.metadata import get_meta
        meta = get_meta(sim_name, redshift=redshift)
        return {"box": float(meta["BoxSize"]), "ppd": int(round(float(meta["NP"]) ** (1 / 3)))}
    except Exception as exc:  # noqa: BLE001 - any failure of the metadata lookup
        raise ValueError(f"cannot size AbacusSummit simulation {sim_name!r}: {exc}") from None


def _halo_estimate(box: float) -> int:
    """Rough halo count, 3e-3 (h/Mpc)^3 x volume (FoF / CompaSO haloes of >~ 20 particles at
    AbacusSummit resolution): it only sizes a small array."""
    return int(3e-3 * box**3)


def sizes_from_dict(data: dict, base_dir: Path | None = None) -> ProblemSize:
    """:class:`ProblemSize` of a training config dict (after overrides), validated into the training
    command's own :class:`~lagbias_mpi.config.train.TrainRunConfig`, so that every default (scales,
    kinds, grids, sampling, epochs, members, network) is the one training uses."""
    from lagbias_mpi.bias.prepare import eval_nmesh
    from lagbias_mpi.config.loader import from_dict
    from lagbias_mpi.config.train import TrainRunConfig

    cfg = from_dict(TrainRunConfig, data)
    sim = cfg.simulation
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    root = Path(__file__).resolve().parents[2]

    def find(p):
        p = Path(p)
        for cand in (p, base_dir / p, root / p):
            if cand.is_file():
                return cand
        return None

    if sim.abacus is not None:
        ab = sim.abacus
        header = _abacus_header(ab.train, float(ab.redshift))
        box, ppd = header["box"], header["ppd"]
        n_ic = int(ab.n_ic or 576)
        n_particles = int(round(ABACUS_SUBSAMPLE_FRACTION[ab.subsamples] * ppd**3))
        n_val, source = len(ab.validate), "abacus"
    elif sim.simulate:
        path = find(sim.simulate)
        if path is None:
            raise ValueError(f"simulation.simulate: config file not found: {sim.simulate}")
        box, ppd, n_ic = builtin_sizes(path, sim.simulate_set)
        n_particles, n_val, source = ppd**3, len(sim.val_realisations), "builtin"
    elif sim.train_files:
        from lagbias_mpi.io.simfile import read_meta
        path = find(sim.train_files[0])
        if path is None:
            raise ValueError(f"simulation.train_files: file not found: {sim.train_files[0]}")
        meta = read_meta(path)
        box, ppd, n_ic, n_particles = meta.box, meta.ppd, meta.n_ic, meta.n_particles
        n_val, source = len(sim.val_files), "file"
    else:
        raise ValueError("config: simulation section gives neither simulate, train_files nor abacus")
    return ProblemSize(
        box=float(box), ppd=int(ppd), n_ic=int(n_ic), n_particles=int(n_particles),
        n_scales=len(cfg.features.radii), n_kinds=len(cfg.features.kinds),
        train_nmesh=max(int(round(box / cfg.grid.cell)), 1), eval_nmesh=eval_nmesh(cfg.grid, box),
        frac=resolve_frac(cfg.sampling.frac, cfg.sampling.per_cell, int(n_particles),
                         max(int(round(box / cfg.grid.cell)), 1) ** 3), batch_size=int(cfg.sampling.batch_size),
        epochs=int(cfg.train.epochs), ensemble=int(cfg.train.ensemble),
        width=int(cfg.model.width), depth=int(cfg.model.depth), n_val=int(n_val),
        n_halos=_halo_estimate(float(box)), source=source, fft_precision=cfg.features.fft_precision,
        density_components=cfg.features.density_components,
        polish_evaluations=int(cfg.train.polish.evaluations),
        kspace_refresh_steps=int(cfg.train.kspace_loss.refresh_steps) if cfg.train.kspace_loss.enabled else 0,
        kspace_in_epochs=bool(cfg.train.kspace_loss.in_epochs))


def builtin_sizes(simulate_config, simulate_set=()) -> tuple[float, int, int]:
    """(box, ppd, n_ic) of the built-in simulation of a simulate config file + overrides."""
    from lagbias_mpi.config.simulate import load_simulate_config

    cfg = load_simulate_config(simulate_config, list(simulate_set or ()))
    return cfg.box, cfg.ppd, cfg.n_ic


def check_train_config(data: dict) -> None:
    """Validate a training config dict with the training command's own dataclasses (raises
    :class:`~lagbias_mpi.config.loader.ConfigError` naming the bad key)."""
    from lagbias_mpi.config.loader import from_dict
    from lagbias_mpi.config.train import TrainRunConfig

    from_dict(TrainRunConfig, data)


def load_sizes(config_path: str, overrides: list[str] | None = None) -> ProblemSize:
    """:class:`ProblemSize` of a training config file (+ ``--set`` overrides), validated with the
    training command's own config dataclasses."""
    data = apply_overrides(load_yaml(config_path), overrides)
    return sizes_from_dict(data, Path(config_path).resolve().parent)
