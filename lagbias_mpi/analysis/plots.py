"""Figures of a training run (matplotlib Agg, rank 0 only): Fig. 3-like spectra ratios with the
min-max band of the members, Fig. 9-like loss per epoch, and f against the leading input."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lagbias_mpi.core.atomic import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_spectra(results: dict[str, dict], path: Path, kmax: float = 0.1) -> None:
    """P_model/P_h (top) and P_uncorr/P_h (bottom) per simulation, average f as a line and the
    members' min-max as a band (paper Fig. 3)."""
    plt = _plt()
    labels = list(results)
    fig, axes = plt.subplots(2, len(labels), figsize=(4.5 * len(labels), 6), sharex=True, squeeze=False)
    for c, label in enumerate(labels):
        r = results[label]
        k = r["k"]
        for row, key in enumerate(("ratio", "uncorr_ratio")):
            ax = axes[row, c]
            mem = r[f"{key}_members"]
            ax.fill_between(k, np.nanmin(mem, axis=0), np.nanmax(mem, axis=0), alpha=0.3, label="members min-max")
            ax.plot(k, r[f"{key}_avg"], "k-", label="average f")
            ax.axvline(kmax, color="grey", lw=0.5, ls=":")
            ax.set_xscale("log")
            ax.set_ylabel("$P_{model}/P_h$" if key == "ratio" else "$P_{uncorr}/P_h$")
            if key == "ratio":
                ax.axhline(1.0, color="grey", lw=0.5)
                ax.set_title(label)
                finite = np.concatenate([mem[np.isfinite(mem)], r["ratio_avg"][np.isfinite(r["ratio_avg"])]])
                lo, hi = (finite.min(), finite.max()) if finite.size else (1.0, 1.0)
                ax.set_ylim(min(0.8, 0.95 * lo), max(1.2, 1.05 * hi))
                ax.legend(fontsize=7)
            else:
                ax.set_xlabel("k [h/Mpc]")
                ax.set_yscale("log")
    _save(fig, path)
    plt.close(fig)


def plot_loss(histories: list[dict], path: Path) -> None:
    """Training and validation loss per epoch for every member (paper Fig. 9); with the full-batch
    phase (``train.polish``) a second panel: the whole set's objective per evaluation, relative to
    its value after the epochs."""
    plt = _plt()
    polished = [h for h in histories if "polish" in h]
    fig, axes = plt.subplots(1, 2 if polished else 1, figsize=(11 if polished else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    for m, h in enumerate(histories):
        ax.plot(h["epoch"], h["train_loss"], "-", color=f"C{m}", label=f"member {m} train")
        if np.isfinite(np.asarray(h["val_loss"], dtype=float)).any():
            ax.plot(h["epoch"], h["val_loss"], "--", color=f"C{m}", label=f"member {m} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per batch")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    if polished:
        ax = axes[0, 1]
        for m, h in enumerate(histories):
            if "polish" not in h:
                continue
            rec = h["polish"]
            ax.plot(rec["evaluations"], np.asarray(rec["train_loss"]) / rec["train_loss"][0], "o-", color=f"C{m}",
                    label=f"member {m} (kept check {rec['kept']})")
        ax.set_xlabel("L-BFGS evaluations after the epochs")
        ax.set_ylabel("whole-set objective / its value after the epochs")
        ax.set_title("full-batch phase (train.polish)")
        ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_f(theta0: np.ndarray, f: np.ndarray, path: Path, f_true: np.ndarray | None = None) -> None:
    """Histogram of f and f against the leading input theta_0 (a sample of particles)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].hist(np.log10(np.maximum(f, 1e-6)), bins=80, histtype="step", label="model")
    if f_true is not None:
        axes[0].hist(np.log10(np.maximum(f_true, 1e-6)), bins=80, histtype="step", label="f_true")
        axes[0].legend()
    axes[0].set_xlabel(r"$\log_{10} f$ (halo mass per particle mass)")
    axes[0].set_ylabel("particles (sample)")
    axes[0].set_title("distribution of f")
    axes[1].scatter(theta0, f, s=1, alpha=0.3, label="model")
    if f_true is not None:
        axes[1].scatter(theta0, f_true, s=1, alpha=0.3, label="f_true")
        axes[1].legend()
    axes[1].set_xlabel(r"$\theta_0$ (leading input)")
    axes[1].set_ylabel("f")
    axes[1].set_yscale("log")
    axes[1].set_title("f against the leading orthogonalised input")
    _save(fig, path)
    plt.close(fig)
