"""Figures of a prediction (matplotlib Agg): the model power spectrum (with the true halo field's
and the correlation coefficient where the simulation has halos) and a slice of the model field.
Not collective: the caller picks the rank that draws."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lagbias_mpi.analysis.plots import _plt, _save


def plot_power(k, p_model, comparison: dict | None, path: Path, kmax: float = 0.1) -> None:
    """P_model(k) (and P_h, P_hm, P_uncorr; r(k) below) in (Mpc/h)^3 against k in h/Mpc."""
    plt = _plt()
    rows = 2 if comparison is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(5.5, 3.2 * rows + 0.8), sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.loglog(k, p_model, "k-", label="$P_{model}$")
    if comparison is not None:
        ax.loglog(comparison["k"], comparison["P_h"], "C0--", label="$P_h$ (true halo field)")
        ax.loglog(comparison["k"], np.abs(comparison["P_hm_avg"]), "C1:", label="$|P_{hm}|$")
        ax.loglog(comparison["k"], np.abs(comparison["uncorr_avg"]), "C2-.", label="$|P_{uncorr}|$")
        r = axes[1, 0]
        r.semilogx(comparison["k"], comparison["corr_avg"], "k-")
        r.axhline(1.0, color="grey", lw=0.5)
        r.axvline(kmax, color="grey", lw=0.5, ls=":")
        r.set_ylabel("$r = P_{hm} / \\sqrt{P_{model} P_h}$")
        r.set_xlabel("k [h/Mpc]")
    else:
        ax.set_xlabel("k [h/Mpc]")
    ax.axvline(kmax, color="grey", lw=0.5, ls=":")
    ax.set_ylabel("P(k) [(Mpc/h)$^3$]")
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_field_slice(plane: np.ndarray, box: float, path: Path, title: str = "") -> None:
    """log10(1 + delta_model) of one plane of the model field (box in Mpc/h)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.3))
    img = ax.imshow(np.log10(np.maximum(plane, 1e-3)).T, origin="lower", cmap="magma",
                    extent=(-box / 2, box / 2, -box / 2, box / 2), vmin=-1.5)
    fig.colorbar(img, ax=ax, label="$\\log_{10}(1 + \\delta_{model})$")
    ax.set_xlabel("y [Mpc/h]")
    ax.set_ylabel("z [Mpc/h]")
    ax.set_title(f"model halo field, middle plane {title}".strip(), fontsize=9)
    _save(fig, path)
    plt.close(fig)
