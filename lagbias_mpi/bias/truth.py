"""The true halo field: the selected halos, mass-weighted, on the training grid (NGP) or as CIC tracers.
"""
from __future__ import annotations

import numpy as np

from lagbias_mpi.io.simfile import LocalSimulation
from lagbias_mpi.mesh.paint import paint
from lagbias_mpi.mpi.comm import global_sum


def select_halos(sim: LocalSimulation, halo_cfg) -> tuple[np.ndarray, np.ndarray]:
    """(positions, weights) of this rank's halos in the selection (mass- or number-weighted)."""
    npart = sim.halo_npart.astype(np.int64)
    mass = npart * sim.meta.particle_mass
    keep = np.ones(len(npart), dtype=bool)
    if halo_cfg.min_npart is not None:
        keep &= npart >= halo_cfg.min_npart
    if halo_cfg.max_npart is not None:
        keep &= npart < halo_cfg.max_npart
    if halo_cfg.min_mass is not None:
        keep &= mass >= halo_cfg.min_mass
    if halo_cfg.max_mass is not None:
        keep &= mass < halo_cfg.max_mass
    weight = npart[keep].astype(np.float64) if halo_cfg.weighting == "mass" else np.ones(int(keep.sum()))
    return sim.halo_pos[keep], weight


def true_tracers(comm, sim: LocalSimulation, halo_cfg, particles=None) -> tuple[np.ndarray, np.ndarray, str]:
    """(positions, weights, description) of the true field's tracers on this rank: planted
    particles weighted by f_true, else the selected halos. Refuses an empty selection.
    ``particles``: (pos, f_true) of the planted particles where they are now (default: as loaded)."""
    if sim.meta.kind == "planted":
        pos, f_true = particles if particles is not None else (sim.pos, sim.f_true)
        if f_true is None:
            raise ValueError(f"{sim.meta.source}: planted simulation without f_true")
        pos, w, what = pos, np.asarray(f_true), "planted f_true"  # float32 is painted as it is
    else:
        pos, w = select_halos(sim, halo_cfg)
        what = f"{int(global_sum(comm, np.int64(len(w))))} halos ({halo_cfg.weighting}-weighted)"
    if float(global_sum(comm, w.sum(dtype=np.float64))) <= 0:
        raise ValueError(f"{sim.meta.source}: the halo selection is empty (check halos.min_npart / "
                         f"min_mass; the particle mass is {sim.meta.particle_mass:.3g} Msun/h)")
    return pos, w, what


def delta_slab(comm, pos, weight, n: int, box: float, method: str) -> np.ndarray:
    """Overdensity slab 1 + delta = N_cells w / sum(w), minus 1, of weighted tracers."""
    grid = paint(comm, pos, weight, n, box, method=method)
    total = float(global_sum(comm, np.asarray(weight, np.float64).sum()))
    return grid * (float(n) ** 3 / total) - 1.0
