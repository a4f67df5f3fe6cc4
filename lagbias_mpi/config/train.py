"""Configuration of ``python -m lagbias_mpi.train``: frozen dataclasses with the paper's defaults.

Every key can be overridden on the command line by its dotted name (``--set train.epochs=3``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np

from lagbias_mpi.config.abacus import AbacusSet
from lagbias_mpi.config.features import KINDS, resolve_scales
from lagbias_mpi.config.loader import config_hash, load_config, to_dict


@dataclass(frozen=True)
class SimulationConfig:
    """Where the training and validation simulations come from.

    Exactly one of: ``simulate`` (a simulate config YAML, generated via
    ``simulate.ensure_simulations`` into ``cache_dir``, default ``data/sims`` under the project root;
    realisation ``train_realisation`` trains, ``val_realisations`` validate), explicit files
    ``train_files`` / ``val_files``, or ``abacus`` (AbacusSummit boxes, :class:`abacus.AbacusSet`).

    Several training simulations (beyond the paper, off by default): more than one ``train_files``,
    or ``train_realisations`` (replaces ``train_realisation`` when not empty). Their batches are
    interleaved in one epoch; see docs/train.md, "Options beyond the paper".
    """

    simulate: Optional[str] = None
    simulate_set: tuple[str, ...] = ()
    cache_dir: Optional[str] = None
    train_realisation: int = 0
    train_realisations: tuple[int, ...] = ()
    val_realisations: tuple[int, ...] = (1,)
    train_files: tuple[str, ...] = ()
    val_files: tuple[str, ...] = ()
    abacus: Optional[AbacusSet] = None

    def __post_init__(self):
        given = [self.simulate is not None, bool(self.train_files), self.abacus is not None]
        if sum(given) != 1:
            raise ValueError("simulation: give exactly one of simulate (a simulate config), "
                             "train_files (+ val_files) or abacus (AbacusSummit)")
        if self.val_files and not self.train_files:
            raise ValueError("simulation.val_files needs train_files")
        if self.train_realisations and self.simulate is None:
            raise ValueError("simulation.train_realisations needs simulation.simulate")
        if any(r < 0 for r in (self.train_realisation, *self.train_realisations, *self.val_realisations)):
            raise ValueError("simulation: realisation indices must be >= 0")
        if len(set(self.train_realisations)) != len(self.train_realisations):
            raise ValueError(f"simulation.train_realisations has duplicates: {list(self.train_realisations)}")
        both = set(self.training_realisations) & set(self.val_realisations)
        if both:
            raise ValueError(f"simulation: training realisation(s) {sorted(both)} also validate")

    @property
    def training_realisations(self) -> tuple[int, ...]:
        """Realisations of ``simulate`` that train (``train_realisations`` or ``(train_realisation,)``)."""
        return self.train_realisations or (self.train_realisation,)


FFT_PRECISIONS = ("float64", "float32")


def fft_dtype(precision: str):
    """numpy dtype of the feature FFTs for a ``features.fft_precision`` value."""
    return np.float32 if precision == "float32" else np.float64


@dataclass(frozen=True)
class FeatureConfig:
    """Smoothing scales (a Table-1 name or radii in Mpc/h), feature kinds, and the precision of the
    feature FFTs (``float64``, or ``float32``: about half the FFT memory per IC cell, features
    equal to ~1e-6 of their std; the features are stored as float32 either way).

    ``density_components``: eigenvectors of the density block (delta, lap at every scale) kept by the
    orthogonalisation: ``paper`` (n_scales + 1, eq. 2.4), ``all``, or a number."""

    scales: Union[str, tuple[float, ...]] = "3Rf coarse"
    kinds: tuple[str, ...] = ("delta", "lap", "g2")
    fft_precision: str = "float64"
    density_components: Union[str, int] = "paper"

    def __post_init__(self):
        resolve_scales(self.scales)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"features.kinds: {bad or 'empty'}; choose from {KINDS}")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError("features.kinds has duplicates")
        if self.fft_precision not in FFT_PRECISIONS:
            raise ValueError(f"features.fft_precision: {self.fft_precision!r}; choose from {FFT_PRECISIONS}")
        dc = self.density_components
        if not (dc in ("paper", "all") or (isinstance(dc, int) and not isinstance(dc, bool) and dc >= 1)):
            raise ValueError(f"features.density_components: {dc!r}; choose paper, all or a number >= 1")

    def n_density_components(self, n_density_columns: int) -> int:
        """Density eigenvectors kept, out of ``n_density_columns`` (delta and lap columns)."""
        dc = self.density_components
        keep = len(self.radii) + 1 if dc == "paper" else n_density_columns if dc == "all" else dc
        return min(keep, n_density_columns)

    @property
    def fft_dtype(self):
        return fft_dtype(self.fft_precision)

    @property
    def radii(self) -> tuple[float, ...]:
        return resolve_scales(self.scales)


@dataclass(frozen=True)
class HaloConfig:
    """True field: halos with min_npart <= N (< max_npart), or by mass in Msun/h; weighted by mass
    (N) or number. Planted simulations use their f_true instead."""

    min_npart: Optional[int] = 150
    max_npart: Optional[int] = None
    min_mass: Optional[float] = None
    max_mass: Optional[float] = None
    weighting: Literal["mass", "number"] = "mass"

    def __post_init__(self):
        if self.min_npart is not None and self.min_mass is not None:
            raise ValueError("halos: give min_npart or min_mass, not both")
        if self.max_npart is not None and self.max_mass is not None:
            raise ValueError("halos: give max_npart or max_mass, not both")
        if self.min_npart is not None and self.min_npart < 1:
            raise ValueError("halos.min_npart must be >= 1")
        lo = self.min_npart if self.min_npart is not None else self.min_mass
        hi = self.max_npart if self.max_npart is not None else self.max_mass
        if (self.min_npart is None) == (self.max_npart is None) and lo is not None and hi is not None and hi <= lo:
            raise ValueError(f"halos: empty range [{lo}, {hi})")


@dataclass(frozen=True)
class GridConfig:
    """Training grid (NGP) cell size in Mpc/h and evaluation grid (CIC) size."""

    cell: float = 5.0
    eval_nmesh: Optional[int] = 256
    eval_cell: Optional[float] = None
    kmax_lowk: float = 0.1  # h/Mpc, bins below enter pk_ratio_lowk

    def __post_init__(self):
        if self.cell <= 0:
            raise ValueError("grid.cell must be > 0 Mpc/h")
        if (self.eval_nmesh is None) == (self.eval_cell is None):
            raise ValueError("grid: give exactly one of eval_nmesh and eval_cell")
        if self.eval_nmesh is not None and self.eval_nmesh < 2:
            raise ValueError("grid.eval_nmesh must be >= 2")
        if self.eval_cell is not None and self.eval_cell <= 0:
            raise ValueError("grid.eval_cell must be > 0")


@dataclass(frozen=True)
class SamplingConfig:
    """Sub-sample fraction per cell and batch size in selected particles.

    ``frac``: a number in (0, 1] (the paper: 0.1), or ``"auto"``: per_cell / (N_part / N_cells), so
    that a cell keeps ``per_cell`` selected particles on average, at least 10% and at most all
    (``training.sampling.resolve_frac``). The paper's 10% of ~500 particles per 5 Mpc/h cell
    (AbacusSummit) is per_cell = 50."""

    frac: Union[float, Literal["auto"]] = 0.1
    batch_size: int = 100_000
    per_cell: float = 50.0

    def __post_init__(self):
        if self.frac != "auto" and not 0 < self.frac <= 1:
            raise ValueError(f"sampling.frac must be in (0, 1] or 'auto', got {self.frac}")
        if not self.per_cell > 0:
            raise ValueError(f"sampling.per_cell must be > 0, got {self.per_cell}")
        if self.batch_size < 1:
            raise ValueError("sampling.batch_size must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    width: int = 64
    depth: int = 5
    activation: Literal["gelu", "relu", "tanh", "silu"] = "gelu"

    def __post_init__(self):
        if self.width < 1 or self.depth < 1:
            raise ValueError("model.width and model.depth must be >= 1")


@dataclass(frozen=True)
class KSpaceLossConfig:
    """Fourier-space loss (beyond the paper, off by default): weight * sum_{|k| <= k_cut} |r_k|^2 / n_cut
    of the residual r = delta_model - delta_true on the whole training grid (all selected
    particles; n_cut modes inside the cut), added to the real-space loss; its gradient coefficients
    are computed from the current model every ``refresh_steps`` batch steps (each time one forward
    pass over all selected particles and two FFTs) and applied in every step
    (:mod:`lagbias_mpi.training.kspace`). ``k_cut`` in h/Mpc, default 1 / (largest smoothing radius);
    ``chunk``: particles per rank per forward pass of the field. ``in_epochs`` false: the loss only
    in the full-batch phase (``train.polish``, one refresh per evaluation there), not in the Adam
    epochs, whose refreshes cost an epoch ~25x at the default batch size."""

    enabled: bool = False
    k_cut: Optional[float] = None
    weight: float = 1.0
    refresh_steps: int = 1
    chunk: int = 200_000
    in_epochs: bool = True

    def __post_init__(self):
        if self.k_cut is not None and not self.k_cut > 0:
            raise ValueError(f"train.kspace_loss.k_cut must be > 0 h/Mpc, got {self.k_cut}")
        if not self.weight > 0:
            raise ValueError(f"train.kspace_loss.weight must be > 0, got {self.weight}")
        if self.chunk < 1:
            raise ValueError("train.kspace_loss.chunk must be >= 1")
        if self.refresh_steps < 1:
            raise ValueError("train.kspace_loss.refresh_steps must be >= 1")

    def kcut(self, radii) -> float:
        """k_cut in h/Mpc: the configured one or 1 / max(radii) (radii in Mpc/h)."""
        return self.k_cut if self.k_cut is not None else 1.0 / max(radii)


@dataclass(frozen=True)
class PolishConfig:
    """The full-batch phase after the epochs (beyond the paper, off by default: ``evaluations`` 0):
    L-BFGS on the grid term of the whole training set with f scaled to its true sum (plus the
    Fourier-space loss when ``kspace_loss`` is on; :mod:`lagbias_mpi.training.polish`), ``evaluations`` evaluations of the objective and its
    gradient in all (the line search's included: each a forward pass and a forward and backward pass
    over all selected particles, about an epoch's arithmetic without the optimiser steps), a
    checkpoint written and the validation objective (when validation sets are at hand) checked every
    ``check_every``; the model of the check with the lowest validation objective is kept.
    ``history``: L-BFGS's memory (pairs of vectors of the parameters' size)."""

    evaluations: int = 0
    check_every: int = 5
    history: int = 20

    def __post_init__(self):
        if self.evaluations < 0:
            raise ValueError(f"train.polish.evaluations must be >= 0 (0: off), got {self.evaluations}")
        if self.check_every < 1:
            raise ValueError(f"train.polish.check_every must be >= 1, got {self.check_every}")
        if self.history < 1:
            raise ValueError(f"train.polish.history must be >= 1, got {self.history}")


@dataclass(frozen=True)
class TrainConfig:
    """Adam with lr * g^(epoch-1), g = ``lr_decay``, or with ``lr_final`` set g = lr_final^(1/(epochs-1))
    (``lr_final`` then replaces ``lr_decay``, also one a config file sets; the last epoch runs at
    lr * lr_final whatever the number of epochs: a run cut short anneals as far as a long one; the
    paper's 0.9 over 50 epochs is lr_final = 0.9^49 = 5.7e-3), the first ``warmup_steps`` optimiser
    steps ramped linearly from lr / warmup_steps (0: none, the paper; f = 10^y reacts exponentially
    to the first large steps); integral constraint from epoch ``constraint_from``:
    eps = max(10^(eps_a + eps_b log10 epoch), eps_min). ``constraint``: ``penalty`` (default) is the
    paper's eq. 2.5 penalty with tolerance eps; ``projection`` (docs/results.md) trains the grid term
    on f scaled to each batch's true sum, so that no gradient reaches the normalisation of f and the
    constraint holds by construction from the first step (eps then enters only the validation loss).
    ``normalise_steps``: while the constraint is on, the output bias is reset after every optimiser
    step so that the running weighted sum of f equals the true field's (the penalty is then reported,
    not back-propagated). ``grid_loss``: the grid term per cell, ``mse`` (the paper's
    (delta_model - delta_true)^2) or ``poisson`` (the Poisson deviance of 1 + delta_model given
    1 + delta_true, :mod:`lagbias_mpi.training.loss`). ``clip_grad``: the gradient's norm clipped at
    this many times the median norm of the last ``clip_window`` steps (0: off, the paper;
    :mod:`lagbias_mpi.training.clipping`)."""

    epochs: int = 50
    ensemble: int = 5
    lr: float = 0.02
    lr_decay: float = 0.9
    lr_final: Optional[float] = None
    seed: int = 1234
    dtype: Literal["float32", "float64"] = "float32"
    constraint_from: int = 2
    eps_a: float = -1.0
    eps_b: float = -3.0
    eps_min: float = 1e-4
    warmup_steps: int = 0
    normalise_steps: bool = False
    constraint: Literal["projection", "penalty"] = "penalty"
    grid_loss: Literal["mse", "poisson"] = "mse"
    guard_y: float = -5.0
    clip_grad: float = 0.0
    clip_window: int = 50
    threads: Optional[int] = None  # torch threads per rank (default 1 under MPI)
    bare_steps: int = 5
    kspace_loss: KSpaceLossConfig = field(default_factory=KSpaceLossConfig)
    polish: PolishConfig = field(default_factory=PolishConfig)
    checkpoint_steps: int = 0  # also checkpoint every this many optimiser steps (0: at epoch ends only)

    def __post_init__(self):
        if self.checkpoint_steps < 0:
            raise ValueError(f"train.checkpoint_steps must be >= 0, got {self.checkpoint_steps}")
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.ensemble < 1:
            raise ValueError(f"train.ensemble must be >= 1, got {self.ensemble}")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError("train.lr must be > 0 and train.lr_decay in (0, 1]")
        if self.lr_final is not None:
            if not 0 < self.lr_final <= 1:
                raise ValueError(f"train.lr_final must be in (0, 1] (the last epoch's lr over lr), got {self.lr_final}")
        if self.seed < 0:
            raise ValueError("train.seed must be >= 0")
        if self.eps_min <= 0 or self.constraint_from < 1:
            raise ValueError("train.eps_min must be > 0 and train.constraint_from >= 1")
        if not self.clip_grad >= 0:
            raise ValueError(f"train.clip_grad must be >= 0 (0: off), got {self.clip_grad}")
        if self.clip_window < 1:
            raise ValueError(f"train.clip_window must be >= 1, got {self.clip_window}")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kspace_loss.enabled and not self.kspace_loss.in_epochs and self.polish.evaluations == 0:
            raise ValueError("train.kspace_loss.in_epochs: false puts the Fourier-space loss in the full-batch phase "
                             "only, which is off (train.polish.evaluations: 0): the loss would be used nowhere")
        if self.polish.evaluations > 0 and self.constraint != "projection":
            raise ValueError("train.polish needs train.constraint: projection (the phase fits f scaled to the "
                             "true sum, as projection does; the penalty's eps has no place in it)")

    @property
    def epoch_decay(self) -> float:
        """The lr's factor from one epoch to the next (``lr_decay``, or from ``lr_final``)."""
        if self.lr_final is None:
            return self.lr_decay
        return self.lr_final ** (1.0 / (self.epochs - 1)) if self.epochs > 1 else 1.0

    def eps(self, epoch: int) -> float | None:
        """Integral-constraint tolerance of ``epoch`` (from 1), or None when it is off."""
        if epoch < self.constraint_from:
            return None
        return max(10.0 ** (self.eps_a + self.eps_b * math.log10(epoch)), self.eps_min)


@dataclass(frozen=True)
class RunConfig:
    name: Optional[str] = None  # run directory runs/<name>; default: the config file's stem
    log_level: str = "INFO"
    figures: bool = True  # write run/figures/*.png
    fail_on_rank: Optional[int] = None  # fault injection for tests: raise on this rank
    # where each rank sets aside what a stage does not need (the training box's positions while the
    # members train, 12 B per particle; removed when read back); default <run dir>/scratch
    scratch_dir: Optional[str] = None


@dataclass(frozen=True)
class TrainRunConfig:
    simulation: SimulationConfig
    features: FeatureConfig = field(default_factory=FeatureConfig)
    halos: HaloConfig = field(default_factory=HaloConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_train_config(path, overrides=None) -> TrainRunConfig:
    """Validated training config from YAML + ``key=value`` overrides."""
    return load_config(TrainRunConfig, path, list(overrides or []))


def config_run_hash(cfg: TrainRunConfig) -> str:
    """Hash of the config without ``run``; the beyond-the-paper keys at their defaults are left out,
    so that runs checkpointed before they existed can still be resumed."""
    d = to_dict(cfg)
    d.pop("run")
    if not d["simulation"].get("train_realisations"):
        d["simulation"].pop("train_realisations", None)
    defaults = to_dict(TrainConfig())
    for key in ("kspace_loss", "warmup_steps", "clip_grad", "clip_window", "lr_final", "polish"):
        if d["train"].get(key) == defaults[key]:
            d["train"].pop(key)
    if d["train"].get("kspace_loss", {}).get("in_epochs") is True:  # the default: hashes of runs before it
        d["train"]["kspace_loss"].pop("in_epochs")
    d["train"].pop("checkpoint_steps", None)  # when checkpoints are written does not change the result
    return config_hash(d)
