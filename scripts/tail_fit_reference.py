"""Is a planted truth's tail identified by the halo field, and does training reach it? (issue #15)

On one rank, for a trained run and its planted training box: the model field and the true field on
the 5 Mpc/h NGP cells of the training grid, and three fits of the same Poisson deviance (f scaled to
the true field's total, as the projection does), each with P_model/P_h at k < 0.1 from the NGP grid,
the median |f/f_true - 1| and sum f / sum f_true over the top 0.01% of f_true:

- ``trained``: the run's first member as trained;
- ``quadratic``: exp(quadratic in the run's inputs), fitted by full-batch L-BFGS from f = 1 (a
  deterministic reference written apart from the training code: no batches, no Adam, no clipping);
- ``polished``: the trained network itself, then full-batch L-BFGS on the same deviance.

    python scripts/tail_fit_reference.py RUN_DIR TRAIN_FILE [--outer 8] [--polish 2] [--polish-evals 10] [--out FILE]

Memory: the whole box's inputs and quadratic features in float64 (~(n_in + n_in (n_in+1)/2) 8 B per
particle): for boxes of a few million particles.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from mpi4py import MPI

from lagbias_mpi.bias.ensemble import load_ensemble, simulation_particles
from lagbias_mpi.bias.routing import flat_cells
from lagbias_mpi.io import sources
from lagbias_mpi.training.loss import grid_per_cell

CELL = 5.0  # Mpc/h, the training grid
KMAX = 0.1


def pk_ratio_lowk(m: np.ndarray, t: np.ndarray, box: float, ng: int) -> float:
    """sum |delta_m(k)|^2 / sum |delta_t(k)|^2 over 0 < k < KMAX (NGP grids of mean 1). A serial numpy
    FFT on purpose, apart from the pipeline's evaluation (CIC, SlabFFT), which it checks."""
    dm, dt = np.fft.rfftn((m - 1).reshape(ng, ng, ng)), np.fft.rfftn((t - 1).reshape(ng, ng, ng))
    kx = np.fft.fftfreq(ng, box / ng) * 2 * np.pi
    kz = np.fft.rfftfreq(ng, box / ng) * 2 * np.pi
    k = np.sqrt(kx[:, None, None] ** 2 + kx[None, :, None] ** 2 + kz[None, None, :] ** 2)
    s = (k > 0) & (k < KMAX)
    return float(np.sum(np.abs(dm[s]) ** 2) / np.sum(np.abs(dt[s]) ** 2))


class TrainingBox:
    def __init__(self, run: str, train_file: str):
        comm = MPI.COMM_SELF
        self.ens = load_ensemble(run)
        parts = simulation_particles(comm, sources.load(comm, sources.file_spec(train_file)), self.ens)
        self.theta = self.ens.inputs(parts.raw, standardised=True).astype(np.float64)
        self.ft = parts.f_true.astype(np.float64)
        self.box = parts.meta.box
        self.ng = int(round(self.box / CELL))
        flat = flat_cells(parts.pos, self.ng, self.box).astype(np.int64)
        t = np.bincount(flat, self.ft, self.ng**3)
        self.t = t / t.mean()
        self.idx, self.tt = torch.as_tensor(flat), torch.as_tensor(self.t)
        self.top = self.ft >= np.quantile(self.ft, 0.9999)

    def cells(self, log10_f: torch.Tensor) -> torch.Tensor:
        f = torch.pow(10.0, log10_f - log10_f.max().detach())
        m = torch.zeros(self.ng**3, dtype=torch.float64).index_add_(0, self.idx, f)
        return m / m.mean()

    def deviance(self, m: torch.Tensor) -> torch.Tensor:
        return grid_per_cell(m, self.tt, "poisson").sum()

    def report(self, log10_f: torch.Tensor) -> dict:
        with torch.no_grad():
            m = self.cells(log10_f)
            f = torch.pow(10.0, log10_f).numpy()
        f = f * self.ft.sum() / f.sum()
        return {"deviance": float(self.deviance(m)),
                "pk_ratio_lowk": pk_ratio_lowk(m.numpy(), self.t, self.box, self.ng),
                "median_rel_err": float(np.median(np.abs(f / self.ft - 1))),
                "top_1e-4_sum_ratio": float(f[self.top].sum() / self.ft[self.top].sum())}


def lbfgs(params, loss_fn, outer: int, label: str, report, evals: int = 25) -> list[dict]:
    opt = torch.optim.LBFGS(params, lr=1, max_iter=evals, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    out, t0 = [], time.time()
    for it in range(outer):
        opt.step(closure)
        out.append({"outer": it + 1, "s": time.time() - t0, **report()})
        print(f"{label} L-BFGS outer {it + 1}: {out[-1]}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("train_file")
    ap.add_argument("--outer", type=int, default=8, help="L-BFGS outer iterations of the quadratic fit")
    ap.add_argument("--polish", type=int, default=2, help="L-BFGS outer iterations on the trained network")
    ap.add_argument("--polish-evals", type=int, default=10, help="loss evaluations per outer iteration of the polish "
                    "(each a float64 forward and backward pass over the whole box)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    b = TrainingBox(a.run, a.train_file)
    net = b.ens.members[0].double()
    x = torch.as_tensor(b.theta)
    res = {"run": a.run, "train_file": a.train_file, "n_particles": len(b.ft), "grid": b.ng}

    def save():  # after every phase: a long polish cut short keeps what was measured
        if a.out:
            tmp = a.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(res, fh, indent=1)
            os.replace(tmp, a.out)
    res["trained"] = b.report(net(x).detach())
    save()
    print(f"trained: {res['trained']}", flush=True)
    n_in = b.theta.shape[1]
    iu = np.triu_indices(n_in)
    phi = np.concatenate([b.theta, (b.theta[:, :, None] * b.theta[:, None, :])[:, iu[0], iu[1]]], axis=1)
    phi = torch.as_tensor((phi - phi.mean(0)) / phi.std(0))
    w = torch.zeros(phi.shape[1], dtype=torch.float64, requires_grad=True)
    res["quadratic"] = lbfgs([w], lambda: b.deviance(b.cells(phi @ w)), a.outer, "quadratic",
                             lambda: b.report((phi @ w).detach()))
    save()
    del phi
    for p in net.parameters():
        p.requires_grad_(True)
    res["polished"] = lbfgs(list(net.parameters()), lambda: b.deviance(b.cells(net(x))), a.polish, "network",
                            lambda: b.report(net(x).detach()), evals=a.polish_evals)
    save()


if __name__ == "__main__":
    main()
