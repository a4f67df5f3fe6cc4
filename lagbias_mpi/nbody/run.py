"""The built-in simulation, end to end: Gaussian ICs, 2LPT, particle mesh, FoF halos, files; and its cache.
"""
from __future__ import annotations

import gc
import json
import resource
from pathlib import Path

import numpy as np
from mpi4py import MPI

from lagbias_mpi import __version__
from lagbias_mpi.config.loader import ConfigError, config_hash, to_dict
from lagbias_mpi.config.simulate import PLANTED_FORMULA, SimulateConfig
from lagbias_mpi.core.atomic import write_json
from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.io.hdf5 import open_h5
from lagbias_mpi.io.simfile import (
    FORMAT,
    LocalSimulation,
    SimulationMeta,
    write_simulation,
)
from lagbias_mpi.mesh.grid import wrap_centred
from lagbias_mpi.mesh.paint import paint
from lagbias_mpi.mesh.power import overdensity, power_spectrum
from lagbias_mpi.mpi.comm import StageTimer, global_sum, peak_rss_mb
from lagbias_mpi.mpi.environment import environment_info
from lagbias_mpi.mpi.fft import SlabFFT
from lagbias_mpi.mpi.layout import slab_bounds
from lagbias_mpi.nbody.checks import _figure, _ratio_block, _safe_lowk, lowk_kmax
from lagbias_mpi.nbody.cosmology import Cosmology, load_cosmology
from lagbias_mpi.nbody.fof import find_halos_distributed
from lagbias_mpi.nbody.hmf import hmf_comparison
from lagbias_mpi.nbody.ics import gaussian_field
from lagbias_mpi.nbody.lpt import lattice_for_slab, lattice_position, lpt_displacements
from lagbias_mpi.nbody.planted import planted_weights
from lagbias_mpi.nbody.pm import PMParticles, evolve

log = get_logger("simulate")


def check_runnable(comm, cfg: SimulateConfig) -> Cosmology:
    """Checks that need the communicator or the cosmology; run before any heavy work."""
    cosmo = load_cosmology(cfg.cosmology)
    for what, n in (("n_ic", cfg.n_ic), ("force mesh (pm.nmesh)", cfg.nmesh)):
        if n < comm.size:
            raise ConfigError(f"{what} = {n} is smaller than the number of ranks {comm.size}: the slab "
                              "FFT needs at least one plane per rank")
    cosmo.table_growth(cfg.z_ic)  # raises a CosmologyError naming the valid range
    return cosmo


def initial_particles(comm, cfg: SimulateConfig, cosmo: Cosmology, fft_ic: SlabFFT,
                      delta_k: np.ndarray) -> PMParticles:
    """2LPT particles at a_ic on the rank whose IC slab holds their lattice point."""
    a_ic = 1.0 / (1.0 + cfg.z_ic)
    lagr = lattice_for_slab(cfg.ppd, cfg.n_ic, fft_ic.real_start, fft_ic.real_stop)
    psi1, psi2 = lpt_displacements(fft_ic, delta_k, lagr, cfg.ppd)
    psi2 *= cosmo.d2_factor(a_ic)
    pos = wrap_centred(lattice_position(lagr, cfg.ppd, cfg.box) + psi1 + psi2, cfg.box)
    mom = a_ic**2 * float(cosmo.efunc(a_ic)) * (cosmo.growth_rate(a_ic) * psi1 + cosmo.growth_rate2(a_ic) * psi2)
    return PMParticles(pos, mom, lagr)


def simulate_one(comm, cfg: SimulateConfig, cosmo: Cosmology, index: int, timer: StageTimer):
    """One realisation. Returns (LocalSimulation, velocities or None, f_true attrs or None,
    diagnostics, member counts of all halos on every rank)."""
    seed = cfg.seed + index
    a_ic, a_f = 1.0 / (1.0 + cfg.z_ic), 1.0 / (1.0 + cfg.z_final)
    with timer.stage("ics"):
        fft_ic = SlabFFT(comm, cfg.n_ic, cfg.box, dtype=np.float32)
        pk_ic = lambda k: cosmo.linear_power(k, cfg.z_ic)  # noqa: E731
        delta, delta_k = gaussian_field(fft_ic, pk_ic, seed)
        ic_delta = delta.astype(np.float32)
        meas_ic = power_spectrum(fft_ic, delta)
        ic_block = _ratio_block(meas_ic, pk_ic(meas_ic["k"]))
        del delta
    with timer.stage("lpt"):
        parts = initial_particles(comm, cfg, cosmo, fft_ic, delta_k)
        del delta_k
    f_attrs = None
    if cfg.halos.kind == "planted":
        with timer.stage("planted"):
            f_raw = planted_weights(comm, fft_ic, ic_delta, parts.lagr, cfg.ppd, cfg.planted)
            mean = float(global_sum(comm, f_raw.sum())) / cfg.n_particles
            parts.extra["f_true"] = f_raw / mean
            f_attrs = {"formula": PLANTED_FORMULA, "radius": cfg.planted.radius, "b1": cfg.planted.b1,
                       "b2": cfg.planted.b2, "c_lap": cfg.planted.c_lap, "normalisation": mean,
                       "standardisation": "global mean 0, std 1 over the N_ic^3 grid",
                       "smoothing": "Gaussian W(k) = exp(-k^2 R^2 / 2) of the stored /ic/delta"}
    del fft_ic
    with timer.stage("pm"):
        parts, pm_diag = evolve(comm, parts, cosmo, cfg.box, cfg.nmesh, a_ic, a_f, cfg.pm.n_steps,
                                cfg.n_particles)
    with timer.stage("power"):
        growth2 = (cosmo.growth(a_f) / cosmo.growth(a_ic)) ** 2
        fft_m = SlabFFT(comm, cfg.nmesh, cfg.box, dtype=np.float32)
        grid = paint(comm, parts.pos, None, cfg.nmesh, cfg.box, method="cic", routed=True)
        meas_f = power_spectrum(fft_m, overdensity(comm, grid), compensate="cic")
        del grid, fft_m
        fin_block = _ratio_block(meas_f, pk_ic(meas_f["k"]) * growth2)
        nb = min(len(meas_f["power"]), len(meas_ic["power"]))
        vs_ic = meas_f["power"][:nb] / (meas_ic["power"][:nb] * growth2)
        class_ratio = meas_f["power"] / cosmo.linear_power(meas_f["k"], cfg.z_final)
    pos32 = parts.pos.astype(np.float32)
    pos32[pos32 >= np.float32(0.5 * cfg.box)] -= np.float32(cfg.box)
    pos32[pos32 < np.float32(-0.5 * cfg.box)] = np.float32(-0.5 * cfg.box)
    if cfg.halos.kind == "fof":
        with timer.stage("fof"):
            hpos, hn = find_halos_distributed(comm, pos32, cfg.box, cfg.halos.linking_length * cfg.box / cfg.ppd,
                                              cfg.halos.min_members)
    else:
        hpos, hn = np.zeros((0, 3)), np.zeros(0, np.int64)
    n_halos = comm.allreduce(len(hn))
    all_npart = comm.bcast(hn if comm.rank == 0 else None, root=0) if cfg.halos.kind == "fof" else np.zeros(0)
    s0, _ = slab_bounds(cfg.n_ic, comm.size, comm.rank)
    meta = SimulationMeta(box=cfg.box, ppd=cfg.ppd, n_ic=cfg.n_ic, redshift=cfg.z_final, z_ic=cfg.z_ic,
                          particle_mass=cosmo.particle_mass(cfg.box, cfg.ppd), n_particles=cfg.n_particles,
                          n_halos=n_halos, cosmology_name=cosmo.name, cosmology=cosmo.params(), seed=seed,
                          kind=cfg.halos.kind)
    sim = LocalSimulation(meta, ic_delta, s0, parts.lagr.astype(np.int32), pos32,
                          hpos.astype(np.float32), hn.astype(np.int64),
                          parts.extra["f_true"].astype(np.float32) if "f_true" in parts.extra else None)
    vel = (100.0 * parts.mom / a_f).astype(np.float32) if cfg.output.write_velocities else None
    kmax = lowk_kmax(cfg.box)
    diag = {
        "seed": seed, "lowk_kmax": kmax,
        "pk_ic_ratio": _safe_lowk(ic_block["k"], ic_block["ratio"], kmax),
        "pk_matter_lowk_ratio": _safe_lowk(fin_block["k"], fin_block["ratio"], kmax),
        "pk_matter_lowk_ratio_vs_ic": _safe_lowk(meas_f["k"][:nb], vs_ic, kmax),
        "pk_matter_lowk_ratio_class": _safe_lowk(meas_f["k"], class_ratio, kmax),
        "momentum_rel": pm_diag["momentum"], "pm_step_s": pm_diag["pm_step_s"], "n_halos": n_halos,
        "pk_ic": ic_block, "pk_final": {**fin_block, "ratio_vs_ic": vs_ic},
        "growth_ic_to_final_pm": float(np.sqrt(growth2)),
        "growth_ic_to_final_table": cosmo.table_growth(cfg.z_final) / cosmo.table_growth(cfg.z_ic),
    }
    return sim, vel, f_attrs, diag, all_npart


def realisation_paths(out_dir: Path, cfg: SimulateConfig) -> list[Path]:
    return [Path(out_dir) / f"realisation_{i}.h5" for i in range(cfg.n_realisations)]


def _file_config_hash(path: Path) -> str | None:
    """Config hash of an existing realisation file or summary.json, None if unreadable."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()).get("config_hash")
        with open_h5(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return "not-a-lagbias-file"
            return config_hash(json.loads(f.attrs["config"]))
    except (OSError, ValueError, KeyError):
        return "unreadable"


def check_out_dir(out_dir: Path, cfg: SimulateConfig) -> None:
    """Refuse an output directory that holds a different simulation."""
    want = config_hash(cfg)
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"output path {out_dir} exists and is not a directory")
    for path in sorted(out_dir.glob("realisation_*.h5")) + [out_dir / "summary.json"]:
        if path.exists():
            got = _file_config_hash(path)
            if got != want:
                raise ConfigError(f"output directory {out_dir} holds a different simulation ({path.name}: "
                                  f"config hash {got}, this config {want}); choose another --out or remove it")


def run_simulation(comm, cfg: SimulateConfig, out_dir) -> dict:
    """Generate every realisation of ``cfg`` into ``out_dir``; write summary.json and the figure.
    Returns the summary (on every rank). Collective."""
    out_dir = Path(out_dir)
    cosmo = check_runnable(comm, cfg)
    err = None
    if comm.rank == 0:
        try:
            check_out_dir(out_dir, cfg)
        except ConfigError as exc:
            err = str(exc)
    err = comm.bcast(err, root=0)
    if err:
        raise ConfigError(err)
    timer = StageTimer(comm)
    cfg_dict = {**to_dict(cfg)}
    log.info(f"simulating {cfg.n_realisations} realisation(s): box {cfg.box} Mpc/h, {cfg.ppd}^3 particles, "
             f"N_ic {cfg.n_ic}, mesh {cfg.nmesh}, z {cfg.z_ic} -> {cfg.z_final} in {cfg.pm.n_steps} steps, "
             f"{cosmo.name} (sigma8 {cosmo.sigma8:.4f}), {comm.size} rank(s) -> {out_dir}")
    realisations, npart_all = [], []
    for i, path in enumerate(realisation_paths(out_dir, cfg)):
        sim, vel, f_attrs, diag, npart = simulate_one(comm, cfg, cosmo, i, timer)
        with timer.stage("write"):
            write_simulation(comm, path, sim, config=cfg_dict, f_true_attrs=f_attrs, vel=vel)
        del sim, vel  # free this realisation before the next one is built (its peak is the job's)
        gc.collect()  # FFT plans and their buffers sit in reference cycles
        realisations.append(diag)
        npart_all.append(npart)
        log.info(f"realisation {i}: {diag['n_halos']} halos, P_ic/P_lin {diag['pk_ic_ratio']:.3f}, "
                 f"P_final/(P_lin D^2) at k<0.1 {diag['pk_matter_lowk_ratio']:.3f} "
                 f"(vs own IC field {diag['pk_matter_lowk_ratio_vs_ic']:.3f}) -> {path}")
    hmf = []
    if cfg.halos.kind == "fof":
        a_ic, a_f = 1 / (1 + cfg.z_ic), 1 / (1 + cfg.z_final)
        # the PM growth history differs slightly from the table's (radiation, neutrinos): use the
        # linear field the simulation actually evolved
        ratio = (cosmo.growth(a_f) / cosmo.growth(a_ic)) / (cosmo.table_growth(cfg.z_final) / cosmo.table_growth(cfg.z_ic))
        hmf = hmf_comparison(cosmo, np.concatenate(npart_all), cosmo.particle_mass(cfg.box, cfg.ppd),
                             cfg.box * cfg.n_realisations ** (1 / 3), cfg.z_final,
                             min_npart=cfg.halos.hmf_min_npart, growth_ratio=ratio)
    walls = timer.summary()
    summary = {
        "command": "simulate", "version": __version__, "environment": environment_info(comm),
        "config": cfg_dict, "config_hash": config_hash(cfg),
        "files": [str(p) for p in realisation_paths(out_dir, cfg)],
        "n_particles": cfg.n_particles, "n_halos": [r["n_halos"] for r in realisations],
        "particle_mass": cosmo.particle_mass(cfg.box, cfg.ppd), "cosmology": cosmo.params(),
        "pk_ic_ratio": float(np.mean([r["pk_ic_ratio"] for r in realisations])),
        "pk_matter_lowk_ratio": float(np.mean([r["pk_matter_lowk_ratio"] for r in realisations])),
        "pk_matter_lowk_ratio_vs_ic": float(np.mean([r["pk_matter_lowk_ratio_vs_ic"] for r in realisations])),
        "pk_matter_lowk_ratio_class": float(np.mean([r["pk_matter_lowk_ratio_class"] for r in realisations])),
        "lowk_kmax": lowk_kmax(cfg.box), "hmf_ratio": hmf, "hmf_fit": "Watson et al. 2013 FoF (A=0.282, alpha=2.163, beta=1.406, gamma=1.210)",
        "pm_step_s": float(np.mean([r["pm_step_s"] for r in realisations])),
        "momentum_rel": max(r["momentum_rel"] for r in realisations),
        "wall_s": walls, "wall_total_s": float(sum(walls.values())),
        "peak_rss_mb": comm.allreduce(peak_rss_mb(), op=MPI.MAX),
        "cpu_s": comm.allreduce(_cpu_seconds(), op=MPI.MAX),
        "realisations": realisations,
    }
    if comm.rank == 0:
        write_json(out_dir / "summary.json", summary)
        if cfg.output.figures:
            _figure(out_dir / "simulate_checks.png", realisations, hmf)
    comm.Barrier()
    return summary


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process so far: the wall time on an idle machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return float(usage.ru_utime + usage.ru_stime)


def ensure_simulations(comm, cfg: SimulateConfig, cache_root) -> list[Path]:
    """Realisation files of ``cfg`` under ``cache_root/<name>-<config hash>/``: reused when all are
    present, generated otherwise. Collective."""
    out_dir = Path(cache_root) / f"{cfg.name}-{config_hash(cfg)}"
    paths = realisation_paths(out_dir, cfg)
    present = comm.bcast(all(p.is_file() for p in paths) and (out_dir / "summary.json").is_file()
                         if comm.rank == 0 else None, root=0)
    if present:
        log.info(f"reusing simulation {out_dir} ({len(paths)} realisation(s))")
    else:
        log.info(f"generating simulation {out_dir} ({len(paths)} realisation(s)); this is done once")
        run_simulation(comm, cfg, out_dir)
    return paths
