"""The built-in simulation: Gaussian ICs, 2LPT, particle-mesh gravity, FoF halos (or planted truth).

``python -m lagbias_mpi.simulate --config FILE.yaml [--set key=value ...] --out DIR`` (under mpirun
too) writes ``DIR/realisation_{i}.h5`` (schema: docs/file_format.md), ``DIR/summary.json`` and
``DIR/simulate_checks.png``. realisation_0 is for training, the others for validation; realisation i
uses the seed ``seed + i``. See docs/simulate.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from mpi4py import MPI

from . import __version__
from .config import ConfigError, config_hash, load_config, to_dict
from .cosmology import Cosmology, CosmologyError, load_cosmology
from .fft import SlabFFT, gaussian_window
from .fof import find_halos_distributed
from .hmf import hmf_comparison
from .ics import gaussian_field
from .layout import slab_bounds
from .logs import get_logger, setup_logging
from .lpt import lattice_for_slab, lattice_position, lpt_displacements
from .output import atomic_path, environment_info, write_json
from .paint import paint, readout_index
from .parallel import StageTimer, abort_on_exception, global_sum, peak_rss_mb
from .pm import Particles, evolve, wrap
from .power import mean_ratio_below, overdensity, power_spectrum
from .simdata import FORMAT, LocalSimulation, SimulationMeta, write_simulation

log = get_logger("simulate")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "simulate_default.yaml"
PLANTED_FORMULA = ("f_true = exp(b1*nu + b2*nu^2 + c_lap*lam) / mean, nu = standardised delta_R, "
                   "lam = standardised laplacian of delta_R, delta_R = initial delta smoothed with a "
                   "Gaussian of radius R, read at idx_ic = round(lagr_index*N_ic/ppd) mod N_ic")


@dataclass(frozen=True)
class PMConfig:
    """Particle-mesh integration."""

    n_steps: int = 20  # kick-drift-kick steps, linear in a from a_ic to a_final
    nmesh: int = 0  # force mesh cells per side; 0 means 2 * ppd

    def __post_init__(self):
        if self.n_steps < 1:
            raise ValueError(f"pm.n_steps must be >= 1, got {self.n_steps}")
        if self.nmesh < 0 or self.nmesh == 1:
            raise ValueError(f"pm.nmesh must be 0 (= 2 ppd) or >= 2, got {self.nmesh}")


@dataclass(frozen=True)
class HaloConfig:
    """Halo finding, or the planted truth."""

    kind: Literal["fof", "planted"] = "fof"
    linking_length: float = 0.2  # in units of the mean interparticle separation box/ppd
    min_members: int = 20
    hmf_min_npart: int = 100  # halos entering the mass-function check

    def __post_init__(self):
        if not 0 < self.linking_length < 0.5:
            raise ValueError(f"halos.linking_length must be in (0, 0.5), got {self.linking_length}")
        if self.min_members < 2:
            raise ValueError(f"halos.min_members must be >= 2, got {self.min_members}")
        if self.hmf_min_npart < self.min_members:
            raise ValueError("halos.hmf_min_npart must be >= halos.min_members")


@dataclass(frozen=True)
class PlantedConfig:
    """The analytic f_true of the planted variant (see PLANTED_FORMULA)."""

    radius: float = 2.83  # Gaussian smoothing radius R in Mpc/h
    b1: float = 1.0
    b2: float = 0.1
    c_lap: float = -0.3

    def __post_init__(self):
        if self.radius <= 0:
            raise ValueError(f"planted.radius must be > 0 Mpc/h, got {self.radius}")
        if self.b2 < 0:
            raise ValueError(f"planted.b2 must be >= 0 (else f_true has no lower tail), got {self.b2}")


@dataclass(frozen=True)
class OutputConfig:
    write_velocities: bool = False  # add /particles/vel [km/s]
    figures: bool = True  # simulate_checks.png


@dataclass(frozen=True)
class SimulateConfig:
    """Configuration of ``python -m lagbias_mpi.simulate`` (defaults = configs/simulate_default.yaml)."""

    name: str = "default"  # names the cache directory <name>-<config hash>
    cosmology: str = "AbacusSummit_base_c000_ph000"
    box: float = 200.0  # Mpc/h
    ppd: int = 128  # particles per dimension
    n_ic: int = 256  # IC grid cells per side (a multiple of ppd)
    z_ic: float = 99.0
    z_final: float = 0.5
    seed: int = 1234  # realisation i uses seed + i
    n_realisations: int = 2
    pm: PMConfig = field(default_factory=PMConfig)
    halos: HaloConfig = field(default_factory=HaloConfig)
    planted: PlantedConfig = field(default_factory=PlantedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}")
        if self.box <= 0:
            raise ValueError(f"box must be > 0 Mpc/h, got {self.box}")
        if self.ppd < 2:
            raise ValueError(f"ppd must be >= 2, got {self.ppd}")
        if self.n_ic < self.ppd or self.n_ic % self.ppd:
            raise ValueError(f"n_ic = {self.n_ic} must be a multiple of ppd = {self.ppd} (the lattice "
                             "must sit on IC grid points)")
        if not 0 <= self.z_final < self.z_ic:
            raise ValueError(f"z_final = {self.z_final} must be >= 0 and below z_ic = {self.z_ic}")
        if self.n_realisations < 1:
            raise ValueError(f"n_realisations must be >= 1, got {self.n_realisations}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def nmesh(self) -> int:
        """Force mesh cells per side."""
        return self.pm.nmesh or 2 * self.ppd

    @property
    def n_particles(self) -> int:
        return self.ppd**3


def load_simulate_config(path=None, overrides: list[str] | None = None) -> SimulateConfig:
    """Config from a YAML file (None: the built-in defaults, equal to configs/simulate_default.yaml)
    plus ``key=value`` overrides."""
    return load_config(SimulateConfig, path, overrides)


def check_runnable(comm, cfg: SimulateConfig) -> Cosmology:
    """Checks that need the communicator or the cosmology; run before any heavy work."""
    cosmo = load_cosmology(cfg.cosmology)
    for what, n in (("n_ic", cfg.n_ic), ("force mesh (pm.nmesh)", cfg.nmesh)):
        if n < comm.size:
            raise ConfigError(f"{what} = {n} is smaller than the number of ranks {comm.size}: the slab "
                              "FFT needs at least one plane per rank")
    cosmo.table_growth(cfg.z_ic)  # raises a CosmologyError naming the valid range
    return cosmo


# ---- the stages -------------------------------------------------------------------------------

def initial_particles(comm, cfg: SimulateConfig, cosmo: Cosmology, fft_ic: SlabFFT,
                      delta_k: np.ndarray) -> Particles:
    """2LPT particles at a_ic on the rank whose IC slab holds their lattice point."""
    a_ic = 1.0 / (1.0 + cfg.z_ic)
    lagr = lattice_for_slab(cfg.ppd, cfg.n_ic, fft_ic.real_start, fft_ic.real_stop)
    psi1, psi2 = lpt_displacements(fft_ic, delta_k, lagr, cfg.ppd)
    psi2 *= cosmo.d2_factor(a_ic)
    pos = wrap(lattice_position(lagr, cfg.ppd, cfg.box) + psi1 + psi2, cfg.box)
    mom = a_ic**2 * float(cosmo.efunc(a_ic)) * (cosmo.growth_rate(a_ic) * psi1 + cosmo.growth_rate2(a_ic) * psi2)
    return Particles(pos, mom, lagr)


def _standardised(comm, slab: np.ndarray) -> np.ndarray:
    n = comm.allreduce(slab.size)
    mean = float(global_sum(comm, slab.sum(dtype=np.float64))) / n
    var = float(global_sum(comm, ((slab - mean) ** 2).sum(dtype=np.float64))) / n
    return (slab - mean) / np.sqrt(var)


def planted_weights(comm, fft_ic: SlabFFT, ic_delta: np.ndarray, lagr: np.ndarray, ppd: int,
                    pc: PlantedConfig) -> np.ndarray:
    """f_true of the local particles (on their Lagrangian IC slab), NOT yet normalised to mean 1.
    Computed from the stored float32 IC field, exactly as the trainer reads it."""
    delta_k = fft_ic.forward(ic_delta)
    k2 = fft_ic.local_k2()
    wk = delta_k * gaussian_window(k2, pc.radius).astype(fft_ic.dtype)
    nu = _standardised(comm, fft_ic.backward(wk))
    lam = _standardised(comm, fft_ic.backward(-k2 * wk))
    n_ic = fft_ic.n
    idx = np.rint(lagr.astype(np.float64) * n_ic / ppd).astype(np.int64) % n_ic
    v, l_ = readout_index(nu, fft_ic.real_start, idx), readout_index(lam, fft_ic.real_start, idx)
    return np.exp(pc.b1 * v + pc.b2 * v**2 + pc.c_lap * l_)


def _ratio_block(meas: dict, expected: np.ndarray) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = meas["power"] / expected
    return {"k": meas["k"], "ratio": ratio, "modes": meas["modes"]}


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


def lowk_kmax(box: float) -> float:
    """Upper k (h/Mpc) of the low-k figures: 0.1, or 2.5 k_f for boxes too small to have a bin below 0.1."""
    return max(0.1, 2.5 * 2 * np.pi / box)


def _safe_lowk(k, ratio, kmax: float) -> float:
    try:
        return mean_ratio_below(np.asarray(k), np.asarray(ratio), kmax)
    except ValueError:
        return float("nan")


# ---- output directory bookkeeping ---------------------------------------------------------------

def realisation_paths(out_dir: Path, cfg: SimulateConfig) -> list[Path]:
    return [Path(out_dir) / f"realisation_{i}.h5" for i in range(cfg.n_realisations)]


def _file_config_hash(path: Path) -> str | None:
    """Config hash of an existing realisation file or summary.json, None if unreadable."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()).get("config_hash")
        from .simdata import h5py
        with h5py.File(path, "r") as f:
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lagbias_mpi.simulate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", default="runs/simulate", help="output directory")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    setup_logging(comm, args.log_level)

    @abort_on_exception(comm)
    def body():
        cfg = load_simulate_config(args.config, args.set)
        run_simulation(comm, cfg, Path(args.out))

    try:
        body()
    except (ConfigError, CosmologyError) as exc:
        log.error(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
