"""Figures of the analysis commands (matplotlib Agg, rank 0 only): Paper I comparison (Fig. 2),
f in principal-component planes (Fig. 5), original vs re-trained spectra (Fig. 6), PC0
coefficients against R_f (Fig. 7) and f against PC0 for thin mass ranges (Fig. 8)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lagbias_mpi.analysis.plots import _plt, _save


def _ratio_band(ax, res: dict, colour: str, style: str, label: str) -> None:
    k, mem = res["k"], res["ratio_members"]
    ax.fill_between(k, np.nanmin(mem, axis=0), np.nanmax(mem, axis=0), color=colour, alpha=0.25)
    ax.plot(k, res["ratio_avg"], style, color=colour, label=f"{label} (average f; band: min-max)")


def _ratio_axes(ax, kmax: float, title: str) -> None:
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.axvline(kmax, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("k [h/Mpc]")
    ax.set_ylabel(r"$P_{\rm model}/P_h$")
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_lstsq(binning, f_bins: np.ndarray, fig2: dict, results: dict, nn_results: dict, path: Path,
               radius: float, kmax: float = 0.1) -> None:
    """Left: f against delta_R per lap_R percentile bin (least squares solid, NN dashed: its mean in
    the bin). Right: P_model/P_h on the first validation simulation (else training)."""
    plt = _plt()
    n_delta, n_lap = len(binning.d_edges) - 1, binning.l_edges.shape[1] - 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = fig2["delta_centre"].reshape(n_delta, n_lap)
    f = f_bins.mean(axis=0).reshape(n_delta, n_lap)
    f_nn = fig2.get("f_nn")
    for j in range(n_lap):
        c = plt.cm.viridis(j / max(n_lap - 1, 1))
        axes[0].plot(x[:, j], f[:, j], "-", color=c, label=f"lap bin {j} (percentile {100 * j // n_lap}-"
                     f"{100 * (j + 1) // n_lap}%), least squares")
        if f_nn is not None:
            axes[0].plot(x[:, j], f_nn.reshape(n_delta, n_lap)[:, j], "--", color=c)
    if f_nn is not None:
        axes[0].plot([], [], "k--", label="NN (dashed, bin mean)")
    axes[0].set_xlabel(rf"$\delta_R / \sigma$ (R = {radius:g} Mpc/h, standardised)")
    axes[0].set_ylabel("f (halo mass per particle, mean 1)")
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set_title("f per $\\nabla^2\\delta$ percentile bin")
    axes[0].legend(fontsize=6)
    label = next((k for k in results if k != "train"), "train")
    _ratio_band(axes[1], results[label], "C0", "-", "least squares")
    if label in nn_results:
        _ratio_band(axes[1], nn_results[label], "C3", "--", "NN")
    _ratio_axes(axes[1], kmax, f"{label} simulation")
    _save(fig, path)
    plt.close(fig)


def plot_pc_planes(pcs: np.ndarray, f: np.ndarray, path: Path, n_show: int = 20000) -> None:
    """Fig. 5: f in the PC0-PC1, PC0-PC2, PC0-PC3 planes (colour = log10 f) and f against PC0
    coloured by PC1..PC3."""
    plt = _plt()
    n_pc = pcs.shape[1]
    others = list(range(1, min(n_pc, 4)))
    pcs, f = pcs[:n_show], f[:n_show]
    logf = np.log10(np.maximum(f, 1e-4))
    ncol = max(len(others), 1)
    fig, axes = plt.subplots(2, ncol, figsize=(5.2 * ncol, 8), squeeze=False, constrained_layout=True)
    vmin, vmax = np.percentile(logf, [2, 99.5]) if len(logf) else (-2, 1)
    for c, j in enumerate(others):
        sc = axes[0, c].scatter(pcs[:, 0], pcs[:, j], c=logf, s=1, cmap="magma", vmin=vmin, vmax=vmax)
        axes[0, c].set_xlabel("PC0")
        axes[0, c].set_ylabel(f"PC{j}")
        axes[0, c].set_title(f"f in the PC0-PC{j} plane")
        fig.colorbar(sc, ax=axes[0, c], label="log10 f")
        sc = axes[1, c].scatter(pcs[:, 0], f, c=pcs[:, j], s=1, cmap="coolwarm", vmin=-2, vmax=2)
        axes[1, c].set_xlabel("PC0")
        axes[1, c].set_ylabel("f")
        axes[1, c].set_title(f"f against PC0, colour: PC{j}")
        fig.colorbar(sc, ax=axes[1, c], label=f"PC{j}")
    if not others:
        axes[1, 0].scatter(pcs[:, 0], f, s=1)
        axes[1, 0].set_xlabel("PC0")
        axes[1, 0].set_ylabel("f")
    _save(fig, path)
    plt.close(fig)


def plot_pc_coefficients(coef: np.ndarray, names: list[str], path: Path, n_pc: int = 1) -> None:
    """Fig. 7: coefficients of the leading PC(s) on the raw features, against R_f per kind."""
    plt = _plt()
    kinds = sorted({n.split("_R")[0] for n in names}, key=lambda k: ["delta", "lap", "g2", "s2"].index(k)
                   if k in ("delta", "lap", "g2", "s2") else 9)
    pretty = {"delta": r"$\delta$", "lap": r"$\nabla^2\delta$", "g2": r"$\mathcal{G}_2$", "s2": "$s^2$"}
    fig, axes = plt.subplots(1, n_pc, figsize=(5.5 * n_pc, 4), squeeze=False, constrained_layout=True)
    for p in range(n_pc):
        ax = axes[0, p]
        for c, kind in enumerate(kinds):
            idx = [i for i, n in enumerate(names) if n.split("_R")[0] == kind]
            r = [float(names[i].split("_R")[1]) for i in idx]
            ax.plot(r, coef[p, idx], "o-", color=f"C{c}", label=pretty.get(kind, kind))
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        radii = sorted({float(n.split("_R")[1]) for n in names})
        ax.set_xticks(radii, [f"{r:g}" for r in radii])
        ax.minorticks_off()
        ax.set_xlabel(r"$R_f$ [Mpc/h]")
        ax.set_ylabel(f"coefficient of PC{p} (standardised features)")
        ax.set_title(f"PC{p} = sum of coefficients x features")
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_f_vs_pc0(centres: np.ndarray, mean_f: np.ndarray, path: Path, label: str, peak: float | None) -> None:
    """Fig. 8-like: binned mean f against PC0 with the peak marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(centres, mean_f, "o-", label=label)
    if peak is not None and np.isfinite(peak):
        ax.axvline(peak, color="C3", ls="--", label=f"peak PC0 = {peak:.2f}")
    ax.set_xlabel("PC0")
    ax.set_ylabel("mean f in the PC0 bin")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_retrain(orig: dict, new: dict, path: Path, k_pcs: int, kmax: float = 0.1) -> None:
    """Fig. 6: P_model/P_h of the original ensemble and of the one re-trained on the leading PCs."""
    plt = _plt()
    labels = [lab for lab in orig if lab in new]
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    for c, lab in enumerate(labels):
        _ratio_band(axes[0, c], orig[lab], "C0", "-", "original")
        _ratio_band(axes[0, c], new[lab], "C3", "--", f"re-trained on {k_pcs} PCs")
        _ratio_axes(axes[0, c], kmax, f"{lab} simulation")
    _save(fig, path)
    plt.close(fig)


def plot_study_spectra(labels: list[str], spectra: list[dict], path: Path, kmax: float = 0.1) -> None:
    """Fig. 4: P_model/P_h and P_uncorr/P_h on the validation simulation for every smoothing-scale set
    (average f as a line, members' min-max as a band)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for i, (label, sp) in enumerate(zip(labels, spectra)):
        key = next((k for k in sp if k != "train"), "train")
        r, c = sp[key], f"C{i}"
        for ax, q in zip(axes, ("ratio", "uncorr_ratio")):
            ax.fill_between(r["k"], np.nanmin(r[f"{q}_members"], axis=0), np.nanmax(r[f"{q}_members"], axis=0),
                            color=c, alpha=0.2)
            ax.plot(r["k"], r[f"{q}_avg"], "-", color=c, label=f"{label} ({key}: {r['pk_ratio_lowk']:.3f})")
    for ax, q in zip(axes, (r"$P_{\rm model}/P_h$", r"$P_{\rm uncorr}/P_h$")):
        ax.axvline(kmax, color="grey", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("k [h/Mpc]")
        ax.set_ylabel(q)
    axes[0].axhline(1.0, color="grey", lw=0.5)
    avg = np.concatenate([sp[next((k for k in sp if k != "train"), "train")]["ratio_avg"] for sp in spectra])
    if np.nanmin(avg) > 0.8 and np.nanmax(avg) < 1.2:
        axes[0].set_ylim(0.8, 1.2)
    axes[0].legend(fontsize=7, title=f"set (mean ratio at k < {kmax:g} h/Mpc)", title_fontsize=7)
    axes[1].set_yscale("log")
    axes[0].set_title("model / halo power (validation), band: members min-max")
    axes[1].set_title("uncorrelated part")
    _save(fig, path)
    plt.close(fig)


def plot_slices(labels: list[str], data: dict, path: Path) -> None:
    """Fig. 10: true halo overdensity slice, model minus true per set, and each set minus the first."""
    plt = _plt()
    n_sets = len(labels)
    ext = [-data["box"] / 2, data["box"] / 2, -data["box"] / 2, data["box"] / 2]
    fig, axes = plt.subplots(2, n_sets + 1, figsize=(3.4 * (n_sets + 1), 6.6), squeeze=False, constrained_layout=True)
    true = data["true"]
    lim = float(np.percentile(np.abs(true), 99)) or 1.0
    kw = {"origin": "lower", "extent": ext, "cmap": "RdBu_r", "vmin": -lim, "vmax": lim}
    im = axes[0, 0].imshow(true.T, **kw)
    axes[0, 0].set_title(r"true $\delta_h$")
    fig.colorbar(im, ax=axes[0, 0], shrink=0.8)
    axes[1, 0].axis("off")
    axes[1, 0].text(0.05, 0.5, f"slice {data['thickness']:.1f} Mpc/h thick\nthrough the box centre\n"
                    "top: model - true\nbottom: set - first set", transform=axes[1, 0].transAxes, fontsize=9)
    for j, (label, m) in enumerate(zip(labels, data["models"])):
        im = axes[0, j + 1].imshow((m - true).T, **kw)
        axes[0, j + 1].set_title(f"{label}: model - true", fontsize=9)
        if j > 0:
            d = m - data["models"][0]
            dl = float(np.percentile(np.abs(d), 99)) or 1.0
            im2 = axes[1, j + 1].imshow(d.T, **{**kw, "vmin": -dl, "vmax": dl})
            axes[1, j + 1].set_title(f"{label} - {labels[0]}", fontsize=9)
            fig.colorbar(im2, ax=axes[1, j + 1], shrink=0.8)
        else:
            axes[1, j + 1].axis("off")
    fig.colorbar(im, ax=axes[0, -1], shrink=0.8, label=r"$\delta$")
    for ax in axes.ravel():
        if ax.axison:
            ax.set_xlabel("x [Mpc/h]")
            ax.set_ylabel("y [Mpc/h]")
    _save(fig, path)
    plt.close(fig)
