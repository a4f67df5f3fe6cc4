"""How much of a planted truth's validation box lies beyond what its training box showed? (issue #15)

On one rank, for a trained run and its planted training and validation boxes: the validation
particles whose f_true exceeds the largest f_true of the training box (the network must extrapolate
there), their share of the validation box's halo mass, the trained ensemble's f over f_true on them
and on the rest, and P_model/P_h at k < 0.1 on the NGP 5 Mpc/h grid (numpy FFT) for the model as it
is and with f set to f_true on those particles only: the part of the validation ratio's gap that
extrapolation explains; the same for the top 1e-5 ... 1e-2 of the validation box's f_true.

    python scripts/extrapolation_check.py RUN_DIR TRAIN_FILE VAL_FILE [--out FILE]

Memory: the validation box's inputs in float64: for boxes of a few million particles.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tail_fit_reference import CELL, pk_ratio_lowk  # noqa: E402

from lagbias_mpi.bias.ensemble import load_ensemble, simulation_particles  # noqa: E402
from lagbias_mpi.bias.routing import flat_cells  # noqa: E402
from lagbias_mpi.io import sources  # noqa: E402


def _box(ens, path):
    comm = MPI.COMM_SELF
    return simulation_particles(comm, sources.load(comm, sources.file_spec(path)), ens)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("train_file")
    ap.add_argument("val_file")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    ens = load_ensemble(a.run)
    f_max_train = float(_box(ens, a.train_file).f_true.max())
    parts = _box(ens, a.val_file)
    ft = parts.f_true.astype(np.float64)
    f = ens.predict_f_members(ens.inputs(parts.raw, standardised=True)).mean(axis=0).astype(np.float64)
    box = parts.meta.box
    ng = int(round(box / CELL))
    flat = flat_cells(parts.pos, ng, box).astype(np.int64)

    def grid(w):
        g = np.bincount(flat, w, ng**3)
        return g / g.mean()
    t = grid(ft)
    beyond = ft > f_max_train
    patched = np.where(beyond, ft * f.sum() / ft.sum(), f)  # f_true in f's normalisation
    res = {"run": a.run, "val_file": a.val_file, "f_true_max_train": f_max_train,
           "f_true_max_val": float(ft.max()), "n_beyond": int(beyond.sum()),
           "mass_share_beyond": float(ft[beyond].sum() / ft.sum()),
           "f_over_f_true_beyond": float(f[beyond].sum() / ft[beyond].sum() * ft.sum() / f.sum()) if beyond.any() else None,
           "f_over_f_true_rest": float(f[~beyond].sum() / ft[~beyond].sum() * ft.sum() / f.sum()),
           "median_rel_err_val": float(np.median(np.abs(f / ft - 1))),  # as the benchmark's (f as predicted)
           "pk_ratio_lowk_val": pk_ratio_lowk(grid(f), t, box, ng),
           "pk_ratio_lowk_val_f_true_beyond": pk_ratio_lowk(grid(patched), t, box, ng)}
    norm = ft.sum() / f.sum()
    res["top_fractions"] = []
    for q in (1e-5, 1e-4, 1e-3, 1e-2):  # the validation box's top q of f_true: share, f / f_true, P with f_true there
        top = ft >= np.quantile(ft, 1 - q)
        res["top_fractions"].append({
            "fraction": q, "n": int(top.sum()), "mass_share": float(ft[top].sum() / ft.sum()),
            "beyond_train_max": int((top & beyond).sum()),
            "f_over_f_true": float(f[top].sum() * norm / ft[top].sum()),
            "pk_ratio_lowk_val_f_true_there": pk_ratio_lowk(grid(np.where(top, ft / norm, f)), t, box, ng)})
    print(json.dumps(res, indent=1), flush=True)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
