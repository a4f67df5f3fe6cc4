"""The trained ensemble as saved in ``run/model.pt``, and helpers to apply it to any simulation.

``model.pt`` (torch.save of a dict): ``format`` "lagbias_mpi.ensemble", ``version``, ``shape``
(network: n_in, width, depth, activation), ``dtype``, ``members`` (list of state dicts),
``feature_names``, ``radii`` (Mpc/h), ``kinds``, ``moments`` {"mean", "std"} (standardisation of the
raw features, from the training simulation's IC grid), ``orthogonaliser`` {"matrix" (n_in x n_raw),
"mean", "eigenvalues"}, ``config`` (resolved training config).

Inputs of the network: theta = M ((raw - mean_std) / std - mu); f = 10^y; the ensemble prediction
is the average f of the members.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lagbias_mpi.bias.model import BiasMLP
from lagbias_mpi.bias.orthogonalise import Orthogonaliser
from lagbias_mpi.config.train import fft_dtype
from lagbias_mpi.core.atomic import atomic_path

FORMAT = "lagbias_mpi.ensemble"


VERSION = 1


CHUNK = 1 << 16  # particles per forward pass: bounds the activations (~16 MB per layer)


class Ensemble:
    """Members + the input transformation; ``predict_f(theta_raw)`` gives the average f."""

    def __init__(self, shape: dict, states: list[dict], orth: Orthogonaliser, moments: tuple,
                 feature_names: list[str], radii, kinds, dtype: str = "float32", config: dict | None = None):
        self.shape, self.orth = dict(shape), orth
        self.moments = (np.asarray(moments[0], np.float64), np.asarray(moments[1], np.float64))
        self.feature_names, self.radii, self.kinds = list(feature_names), tuple(radii), tuple(kinds)
        self.dtype, self.config = dtype, config or {}
        self.torch_dtype = getattr(torch, dtype)
        self.members = []
        for st in states:
            m = BiasMLP(**self.shape).to(self.torch_dtype)
            m.load_state_dict(st)
            m.eval()
            self.members.append(m)

    @property
    def fft_dtype(self):
        """Precision of the feature FFTs of the training run (``features.fft_precision``)."""
        return fft_dtype(self.config.get("features", {}).get("fft_precision", "float64"))

    @property
    def n_members(self) -> int:
        return len(self.members)

    def inputs(self, raw: np.ndarray, standardised: bool = False) -> np.ndarray:
        """Network inputs theta (n, n_in) of raw feature rows (n, n_raw)."""
        raw = np.asarray(raw, dtype=np.float64)
        if not standardised:
            raw = (raw - self.moments[0]) / self.moments[1]
        return self.orth.apply(raw)

    def predict_y_members(self, theta: np.ndarray, dtype=np.float64) -> np.ndarray:
        """y = log10 f of every member (n_members, n) for network inputs ``theta``, as ``dtype``."""
        theta = np.asarray(theta)
        out = np.empty((self.n_members, len(theta)), dtype=dtype)
        with torch.no_grad():
            for lo in range(0, len(theta), CHUNK):
                x = torch.as_tensor(theta[lo:lo + CHUNK], dtype=self.torch_dtype)
                for m, net in enumerate(self.members):
                    out[m, lo:lo + CHUNK] = net(x).double().numpy()
        return out

    def predict_f_members(self, theta: np.ndarray, dtype=np.float64) -> np.ndarray:
        """f = 10^y of every member (n_members, n) as ``dtype`` (float32 halves the evaluation's
        per-particle memory: 4 B per member)."""
        if np.dtype(dtype) == np.float64:
            y = self.predict_y_members(theta)
            return np.power(10.0, y, out=y)
        theta = np.asarray(theta)
        out = np.empty((self.n_members, len(theta)), dtype=dtype)
        for lo in range(0, len(theta), CHUNK):  # 10^y in float64, one chunk at a time
            out[:, lo:lo + CHUNK] = 10.0 ** self.predict_y_members(theta[lo:lo + CHUNK])
        return out

    def predict_f(self, theta_raw: np.ndarray, standardised: bool = False) -> np.ndarray:
        """Ensemble-average f of raw feature rows (as :func:`lagbias_mpi.bias.features.compute_features`
        gives them, or already standardised)."""
        return self.predict_f_members(self.inputs(theta_raw, standardised)).mean(axis=0)

    def to_payload(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "shape": self.shape, "dtype": self.dtype,
                "members": [m.state_dict() for m in self.members], "feature_names": self.feature_names,
                "radii": list(self.radii), "kinds": list(self.kinds),
                "moments": {"mean": self.moments[0], "std": self.moments[1]},
                "orthogonaliser": self.orth.to_dict(), "config": self.config}

    def save(self, path) -> None:
        """Write model.pt atomically (call on one rank)."""
        with atomic_path(path) as tmp:
            torch.save(self.to_payload(), tmp)


def from_payload(p: dict) -> Ensemble:
    if p.get("format") != FORMAT:
        raise ValueError("not a lagbias_mpi ensemble file")
    return Ensemble(p["shape"], p["members"], Orthogonaliser.from_dict(p["orthogonaliser"]),
                    (p["moments"]["mean"], p["moments"]["std"]), p["feature_names"], p["radii"],
                    p["kinds"], p["dtype"], p.get("config"))


def load_ensemble(run_dir) -> Ensemble:
    """Load ``run_dir/model.pt`` (or a model.pt path)."""
    path = Path(run_dir)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no trained ensemble at {path}")
    return from_payload(torch.load(path, map_location="cpu", weights_only=False))


def simulation_particles(comm, sim, ensemble: Ensemble):
    """This rank's particles of ``sim`` with their standardised raw features (Lagrangian-routed),
    computed exactly as in training (the ensemble's scales, kinds and standardisation); use
    ``ensemble.predict_f(parts.raw, standardised=True)``. Collective."""
    from lagbias_mpi.bias.particles import featurised_particles

    return featurised_particles(comm, sim, ensemble.radii, ensemble.kinds, ensemble.moments,
                                fft_dtype=ensemble.fft_dtype)[0]
