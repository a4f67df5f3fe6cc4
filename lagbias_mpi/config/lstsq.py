"""Configuration of Paper I's binned least-squares f (``python -m lagbias_mpi.lstsq``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lagbias_mpi.config.train import FeatureConfig, TrainRunConfig


@dataclass(frozen=True)
class LstsqConfig:
    """Binning of the (delta, lap) plane of one scale (standardised features, units of their std)."""

    scale: Optional[float] = None  # Mpc/h; default: the single scale of features.scales
    n_delta: int = 20
    n_lap: int = 5
    delta_range: tuple[float, ...] = (-3.0, 4.0)  # inner delta edges span this; outer bins open
    fine_bins: int = 2048  # histogram bins per delta bin for the lap percentiles
    constraint_weight: float = 1e6  # weight of the <f> = 1 row relative to trace(A^T A) / n_bins

    def __post_init__(self):
        if self.n_delta < 1 or self.n_lap < 1:
            raise ValueError("lstsq.n_delta and lstsq.n_lap must be >= 1")
        if len(self.delta_range) != 2 or not self.delta_range[0] < self.delta_range[1]:
            raise ValueError(f"lstsq.delta_range must be [low, high] with low < high, got {self.delta_range}")
        if self.fine_bins < 8 * self.n_lap:
            raise ValueError("lstsq.fine_bins must be >= 8 * lstsq.n_lap")
        if not self.constraint_weight > 0:
            raise ValueError("lstsq.constraint_weight must be > 0")
        if self.scale is not None and self.scale <= 0:
            raise ValueError("lstsq.scale must be > 0 Mpc/h")

    @property
    def n_bins(self) -> int:
        return self.n_delta * self.n_lap


@dataclass(frozen=True)
class LstsqRunConfig(TrainRunConfig):
    """A training config (its sections; ``model`` is accepted and ignored) plus the ``lstsq`` section,
    with one smoothing scale of (delta, lap) by default. ``train.ensemble`` sub-samples with seeds
    (``train.seed``, member) as in training."""

    features: FeatureConfig = field(default_factory=lambda: FeatureConfig(scales="1Rf", kinds=("delta", "lap")))
    lstsq: LstsqConfig = field(default_factory=LstsqConfig)

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        radii = self.features.radii
        if self.lstsq.scale is None and len(radii) != 1:
            raise ValueError(f"lstsq works on one scale: features.scales has {len(radii)} ({radii}); "
                             "set lstsq.scale or give one scale")
        if self.lstsq.scale is not None and not any(abs(r - self.lstsq.scale) < 1e-9 for r in radii):
            raise ValueError(f"lstsq.scale {self.lstsq.scale} is not one of features.scales {radii}")

    @property
    def radius(self) -> float:
        return float(self.lstsq.scale if self.lstsq.scale is not None else self.features.radii[0])
