"""``spectra.h5``: the evaluation spectra of a run (docs/run_directory.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lagbias_mpi.core.atomic import atomic_path
from lagbias_mpi.io.hdf5 import open_h5


def write_spectra(path, results: dict[str, dict], meta: dict[str, dict]) -> None:
    """Write ``spectra.h5`` (rank 0): one group per simulation label with the arrays of
    :func:`evaluate_simulation`, attrs role/source/pk_ratio_lowk/mean_f."""

    with atomic_path(path) as tmp:
        with open_h5(tmp, "w") as f:
            f.attrs["format"] = "lagbias_mpi.spectra"
            f.attrs["units"] = "k in h/Mpc, P in (Mpc/h)^3; *_members rows are ensemble members"
            for label, res in results.items():
                g = f.create_group(label)
                for key, val in res.items():
                    if isinstance(val, np.ndarray):
                        g.create_dataset(key, data=val)
                g.attrs["pk_ratio_lowk"] = res["pk_ratio_lowk"]
                g.attrs["pk_ratio_lowk_members"] = np.asarray(res["pk_ratio_lowk_members"])
                g.attrs["mean_f"] = res["mean_f"]
                for key in ("pk_ratio_lowk_modes", "truth_per_particle", "truth_shot_noise"):
                    if key in res:
                        g.attrs[key] = res[key]
                for k, v in meta.get(label, {}).items():
                    g.attrs[k] = v


def read_spectra(path: Path) -> dict:
    """The groups of a ``spectra.h5`` as {label: {key: array}} (rank 0, small arrays)."""

    out = {}
    with open_h5(path, "r") as f:
        for label, g in f.items():
            out[label] = {k: g[k][()] for k in g}
            out[label]["pk_ratio_lowk"] = float(g.attrs["pk_ratio_lowk"])
    return out
