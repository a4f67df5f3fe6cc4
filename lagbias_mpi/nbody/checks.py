"""Physics checks of a built-in simulation (P(k) against linear theory, mass function) and their figure.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lagbias_mpi.core.atomic import atomic_path
from lagbias_mpi.mesh.power import mean_ratio_below


def _ratio_block(meas: dict, expected: np.ndarray) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = meas["power"] / expected
    return {"k": meas["k"], "ratio": ratio, "modes": meas["modes"]}


def lowk_kmax(box: float) -> float:
    """Upper k (h/Mpc) of the low-k figures: 0.1, or 2.5 k_f for boxes too small to have a bin below 0.1."""
    return max(0.1, 2.5 * 2 * np.pi / box)


def _safe_lowk(k, ratio, kmax: float) -> float:
    try:
        return mean_ratio_below(np.asarray(k), np.asarray(ratio), kmax)
    except ValueError:
        return float("nan")


def _figure(path: Path, realisations: list[dict], hmf: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, r in enumerate(realisations):
        axes[0].semilogx(r["pk_ic"]["k"], r["pk_ic"]["ratio"], label=f"realisation {i}")
        axes[1].semilogx(r["pk_final"]["k"], r["pk_final"]["ratio"], label=f"{i}: / linear x D^2")
        axes[1].semilogx(r["pk_final"]["k"][: len(r["pk_final"]["ratio_vs_ic"])], r["pk_final"]["ratio_vs_ic"],
                         "--", label=f"{i}: / (IC field x D^2)")
    axes[0].set(xlabel="k [h/Mpc]", ylabel="P_IC / P_lin(z_ic)", title="initial field", ylim=(0.5, 1.5))
    axes[1].set(xlabel="k [h/Mpc]", ylabel="ratio", title="final matter P(k)", ylim=(0.5, 3.0))
    for ax in axes[:2]:
        ax.axhline(1, color="k", lw=0.5)
        ax.axvline(0.1, color="gray", lw=0.5, ls=":")
        ax.legend(fontsize=7)
    if hmf:
        m = [np.sqrt(b["m_lo"] * b["m_hi"]) for b in hmf]
        axes[2].errorbar(m, [b["ratio"] for b in hmf], yerr=[b["poisson_error"] for b in hmf], fmt="o")
        axes[2].set_xscale("log")
    axes[2].axhline(1, color="k", lw=0.5)
    axes[2].fill_between([1e10, 1e17], 0.75, 1.25, color="gray", alpha=0.2)
    axes[2].set(xlabel="M [Msun/h]", ylabel="n_FoF / Watson13", title="mass function (>= hmf_min_npart)")
    if hmf:
        axes[2].set_xlim(min(b["m_lo"] for b in hmf) / 1.5, max(b["m_hi"] for b in hmf) * 1.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
