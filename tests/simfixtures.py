"""Small in-test simulations written with simdata.write_simulation (so they go through the loader).

A Gaussian initial field with a power-law spectrum, particles on a lattice displaced by the
Zel'dovich approximation, and either a planted f_true (a smooth known function of the smoothed
initial density and its Laplacian, mean 1) or mock "halos" placed on particles. Built with numpy on
rank 0 (test sizes only) and written with COMM_SELF; other ranks wait.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from mpi4py import MPI

from lagbias_mpi.io.simfile import LocalSimulation, SimulationMeta, write_simulation


def _field(n: int, box: float, seed: int, index: float = -2.0, sigma_psi: float = 1.5):
    """(delta on the n^3 grid, Zel'dovich displacement (3, n, n, n) in Mpc/h)."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal((n, n, n))
    wk = np.fft.rfftn(white)
    kf = 2 * np.pi / box
    kx = np.fft.fftfreq(n, 1.0 / n)[:, None, None] * kf
    ky = np.fft.fftfreq(n, 1.0 / n)[None, :, None] * kf
    kz = np.arange(n // 2 + 1)[None, None, :] * kf
    k2 = kx**2 + ky**2 + kz**2
    k2[0, 0, 0] = 1.0
    dk = wk * k2 ** (index / 4.0)
    dk[0, 0, 0] = 0.0
    psi = [np.fft.irfftn(1j * k / k2 * dk, s=(n, n, n), axes=(0, 1, 2)) for k in (kx, ky, kz)]
    rms = np.sqrt(np.mean(sum(p**2 for p in psi)))
    amp = sigma_psi / rms
    delta = np.fft.irfftn(dk, s=(n, n, n), axes=(0, 1, 2)) * amp
    return delta, np.array(psi) * amp


def _smooth(delta, box, radius):
    n = delta.shape[0]
    kf = 2 * np.pi / box
    kx = np.fft.fftfreq(n, 1.0 / n)[:, None, None] * kf
    ky = np.fft.fftfreq(n, 1.0 / n)[None, :, None] * kf
    kz = np.arange(n // 2 + 1)[None, None, :] * kf
    k2 = kx**2 + ky**2 + kz**2
    dk = np.fft.rfftn(delta) * np.exp(-0.5 * k2 * radius**2)
    return np.fft.irfftn(dk, s=delta.shape, axes=(0, 1, 2)), np.fft.irfftn(-k2 * dk, s=delta.shape, axes=(0, 1, 2))


def planted_f(delta_ic, box, radius, b1=1.0, b2=0.1, c_lap=-0.3):
    """f_true on the grid: exp(b1 nu + b2 nu^2 + c_lap lam), nu, lam standardised (un-normalised)."""
    d, lap = _smooth(delta_ic, box, radius)
    nu = (d - d.mean()) / d.std()
    lam = (lap - lap.mean()) / lap.std()
    return np.exp(b1 * nu + b2 * nu**2 + c_lap * lam)


def make_simulation(path, ppd=32, box=128.0, seed=1, kind="planted", radius=None, sigma_psi=1.5,
                    shuffle=True, b1=1.0, b2=0.1, c_lap=-0.3) -> Path:
    """Write a small simulation file collectively (rank 0 builds it); returns its path."""
    comm = MPI.COMM_WORLD
    path = Path(path)
    if comm.rank == 0 and not path.exists():
        n = ppd
        delta, psi = _field(n, box, seed, sigma_psi=sigma_psi)
        cell = box / n
        lagr = np.stack(np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 3)
        q = -box / 2 + lagr * cell
        disp = psi.reshape(3, -1).T
        pos = np.mod(q + disp + box / 2, box) - box / 2
        pos = np.where(pos >= box / 2, pos - box, pos).astype(np.float32)
        f = planted_f(delta, box, radius if radius is not None else 2 * cell, b1, b2, c_lap).reshape(-1)
        f = f / f.mean()
        rng = np.random.default_rng(seed + 1000)
        if kind == "planted":
            hpos, hn, f_true = np.zeros((0, 3), np.float32), np.zeros(0, np.int64), f.astype(np.float32)
        else:
            # mock halos: particles chosen with probability ~ f, with Poisson member counts ~ 30 f
            take = rng.random(len(f)) < np.minimum(0.05 * f, 1.0)
            hpos = pos[take]
            hn = 1 + rng.poisson(30 * f[take])
            f_true = None
        order = rng.permutation(len(pos)) if shuffle else np.arange(len(pos))
        meta = SimulationMeta(box=box, ppd=ppd, n_ic=n, redshift=0.5, z_ic=99.0, particle_mass=1e11,
                              n_particles=len(pos), n_halos=len(hpos), cosmology_name="powerlaw",
                              seed=seed, kind=kind)
        sim = LocalSimulation(meta, delta.astype(np.float32), 0, lagr[order].astype(np.int32), pos[order],
                              hpos.astype(np.float32), hn, None if f_true is None else f_true[order])
        write_simulation(MPI.COMM_SELF, path, sim, {"test": True})
    comm.Barrier()
    return path


def write_config(path, train_file, val_files=(), **sections) -> Path:
    """A training config YAML with small defaults for tests; ``sections`` override whole keys."""
    import yaml

    cfg = {
        "simulation": {"train_files": [str(train_file)], "val_files": [str(v) for v in val_files]},
        "features": {"scales": [8.0, 16.0], "kinds": ["delta", "lap", "g2"]},
        "halos": {"min_npart": 1},
        "grid": {"cell": 8.0, "eval_nmesh": 32},
        "sampling": {"frac": 0.5, "batch_size": 4000},
        "model": {"width": 16, "depth": 2},
        "train": {"epochs": 3, "ensemble": 1, "lr": 0.01, "seed": 7, "bare_steps": 2},
        "run": {"log_level": "WARNING"},
    }
    for key, val in sections.items():
        cfg.setdefault(key, {}).update(val)
    path = Path(path)
    if MPI.COMM_WORLD.rank == 0:
        path.write_text(yaml.safe_dump(cfg))
    MPI.COMM_WORLD.Barrier()
    return path
