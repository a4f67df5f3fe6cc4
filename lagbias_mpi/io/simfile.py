"""The simulation data model (DESIGN.md section 3) and the HDF5 file format of lagbias_mpi.

Whatever its source (the built-in simulation, AbacusSummit), a simulation reaches the pipeline as a
:class:`LocalSimulation` on every rank: the metadata, this rank's slab of the initial overdensity,
a share of the particles (Lagrangian lattice index and final position) and a share of the halos.
Particles and halos may sit on any rank; the pipeline routes them.

HDF5 schema (one file per realisation; see docs/file_format.md):

    /                 attrs: format="lagbias_mpi.simulation", format_version, box [Mpc/h], ppd,
                      n_ic, z_ic, redshift, cosmology_name, cosmology (JSON), particle_mass
                      [Msun/h], seed, kind ("fof" or "planted"), n_particles, n_halos,
                      code_version, config (JSON)
    /ic/delta         (n_ic, n_ic, n_ic) float32, initial overdensity at z_ic, [0,0,0] at -box/2
    /particles/lagr_index  (N, 3) int32, lattice index in [0, ppd)
    /particles/pos         (N, 3) float32, final comoving position in [-box/2, box/2) Mpc/h
    /particles/vel         (N, 3) float32, optional, peculiar velocity [km/s]
    /halos/pos        (Nh, 3) float32, centre of mass x_com [Mpc/h]
    /halos/npart      (Nh,) int64, member count N
    /halos/mass       (Nh,) float64, N x particle_mass [Msun/h]
    /planted/f_true   (N,) float32 (kind "planted" only): the analytic weight each particle carries
                      in the true field, normalised to mean 1 over all particles; attrs describe it.

Writing is done by all ranks in turn (rank r appends its rows at its global offset), so no rank ever
holds all particles; reading gives each rank a contiguous, balanced range of rows and its IC slab.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lagbias_mpi import __version__
from lagbias_mpi.io.hdf5 import open_h5
from lagbias_mpi.mpi.layout import slab_bounds

FORMAT = "lagbias_mpi.simulation"


FORMAT_VERSION = 1


class SimulationFileError(ValueError):
    """A simulation file is missing or malformed; the message names it."""


@dataclass(frozen=True)
class SimulationMeta:
    """Global description of a simulation (identical on every rank)."""

    box: float  # Mpc/h
    ppd: int  # particles per dimension of the Lagrangian lattice
    n_ic: int  # cells per side of the initial-density grid
    redshift: float  # of the particles and halos
    z_ic: float  # of the initial density
    particle_mass: float  # Msun/h (of one particle of the full lattice)
    n_particles: int  # particles in the particle set (all of them, or the loaded sub-samples)
    n_halos: int
    cosmology_name: str = "unknown"
    cosmology: dict = field(default_factory=dict)
    seed: int | None = None
    kind: str = "fof"  # "fof" (halos found), "planted" (f_true known), "abacus"
    source: str = ""  # file or directory it came from
    particle_fraction: float = 1.0  # fraction of the lattice present (AbacusSummit sub-samples)


@dataclass
class LocalSimulation:
    """What one rank holds of a simulation."""

    meta: SimulationMeta
    ic_delta: np.ndarray  # (stop - start, n_ic, n_ic) slab of the initial overdensity
    ic_start: int  # first global plane of ic_delta
    lagr_index: np.ndarray  # (n, 3) int32 lattice index in [0, ppd)
    pos: np.ndarray  # (n, 3) float32 final position in [-box/2, box/2) Mpc/h
    halo_pos: np.ndarray  # (nh, 3) float32
    halo_npart: np.ndarray  # (nh,) int64
    f_true: np.ndarray | None = None  # (n,) planted weight, kind == "planted"
    extra: dict = field(default_factory=dict)  # source-specific columns


def row_range(n_rows: int, comm) -> tuple[int, int]:
    """Balanced contiguous row range ``[lo, hi)`` of this rank for reading ``n_rows`` rows."""
    return slab_bounds(n_rows, comm.size, comm.rank)


def _meta_from_attrs(attrs, path: Path) -> SimulationMeta:
    try:
        return SimulationMeta(
            box=float(attrs["box"]), ppd=int(attrs["ppd"]), n_ic=int(attrs["n_ic"]),
            redshift=float(attrs["redshift"]), z_ic=float(attrs["z_ic"]),
            particle_mass=float(attrs["particle_mass"]), n_particles=int(attrs["n_particles"]),
            n_halos=int(attrs["n_halos"]), cosmology_name=str(attrs["cosmology_name"]),
            cosmology=json.loads(attrs["cosmology"]), seed=int(attrs["seed"]),
            kind=str(attrs["kind"]), source=str(path),
        )
    except KeyError as exc:
        raise SimulationFileError(f"{path}: missing attribute {exc}") from None


def _expected_layout(meta: SimulationMeta) -> dict:
    """{dataset: (shape, allowed numpy dtype kinds, required)} of a file with metadata ``meta``."""
    n, nh = meta.n_particles, meta.n_halos
    return {"ic/delta": ((meta.n_ic,) * 3, "f", True),
            "particles/lagr_index": ((n, 3), "iu", True),
            "particles/pos": ((n, 3), "f", True),
            "particles/vel": ((n, 3), "f", False),
            "halos/pos": ((nh, 3), "f", False),
            "halos/npart": ((nh,), "iu", False),
            "halos/mass": ((nh,), "f", False),
            "planted/f_true": ((n,), "f", meta.kind == "planted")}


def _check_layout(f, meta: SimulationMeta, path: Path) -> None:
    """Refuse a file whose metadata or datasets (presence, shape, dtype) do not fit the schema
    (cheap: no data is read)."""
    if not (np.isfinite(meta.box) and meta.box > 0) or meta.ppd < 1 or meta.n_ic < 1 or meta.n_particles < 0 \
            or meta.n_halos < 0:
        raise SimulationFileError(f"{path}: meaningless metadata box={meta.box}, ppd={meta.ppd}, n_ic={meta.n_ic}, "
                                  f"n_particles={meta.n_particles}, n_halos={meta.n_halos}")
    for name, (shape, kinds, required) in _expected_layout(meta).items():
        if name not in f:
            if required:
                raise SimulationFileError(f"{path}: dataset /{name} missing")
            continue
        d = f[name]
        if not hasattr(d, "dtype"):  # a group
            raise SimulationFileError(f"{path}: /{name} is not a dataset")
        if d.shape != shape:
            raise SimulationFileError(f"{path}: /{name} has shape {d.shape}, expected {shape}")
        if d.dtype.kind not in kinds:
            what = {"f": "floating point", "iu": "integer"}[kinds]
            raise SimulationFileError(f"{path}: /{name} has dtype {d.dtype}, expected {what}")
    if ("halos/pos" in f) != ("halos/npart" in f):
        raise SimulationFileError(f"{path}: /halos/pos and /halos/npart must be given together")


def read_meta(path: str | os.PathLike) -> SimulationMeta:
    """Metadata of a simulation file, its datasets checked against the schema (cheap; any rank)."""
    path = Path(path)
    if not path.is_file():
        raise SimulationFileError(f"simulation file not found: {path}")
    try:
        with open_h5(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise SimulationFileError(f"{path} is not a lagbias_mpi simulation file")
            meta = _meta_from_attrs(f.attrs, path)
            _check_layout(f, meta, path)
            return meta
    except OSError as exc:
        raise SimulationFileError(f"cannot read simulation file {path}: {exc}") from None


VALUE_CHECK_ROWS = 1 << 18  # rows per step of the value checks (their masks stay a few MB)


def _value_problems(meta: SimulationMeta, ic, lagr, pos, f_true, halo_pos) -> list[tuple[str, int, str]]:
    """(what, count, an example) of the bad values in this rank's share (pure; the masks are built
    a chunk of rows at a time)."""
    half = 0.5 * meta.box * (1 + 1e-6)
    checks = [
        ("non-finite values in /ic/delta", lambda x: ~np.isfinite(x), ic),
        ("non-finite positions in /particles/pos", lambda x: ~np.isfinite(x).all(axis=1), pos),
        (f"positions outside the box [-{meta.box / 2:g}, {meta.box / 2:g}) Mpc/h in /particles/pos",
         lambda x: np.isfinite(x).all(axis=1) & (np.abs(x) > half).any(axis=1), pos),
        (f"lattice indices outside [0, ppd = {meta.ppd}) in /particles/lagr_index",
         lambda x: ((x < 0) | (x >= meta.ppd)).any(axis=1), lagr),
        ("non-finite halo positions in /halos/pos", lambda x: ~np.isfinite(x).all(axis=1), halo_pos),
    ]
    if f_true is not None:
        checks.append(("negative or non-finite weights in /planted/f_true",
                       lambda x: ~(np.isfinite(x) & (x >= 0)), f_true))
    out = []
    for what, is_bad, values in checks:
        count, example = 0, ""
        for lo in range(0, len(values), VALUE_CHECK_ROWS):
            chunk = values[lo:lo + VALUE_CHECK_ROWS]
            bad = is_bad(chunk)
            n_bad = int(np.count_nonzero(bad))
            if n_bad and not count:  # a value or a row
                example = str(chunk[np.unravel_index(np.argmax(bad), bad.shape)])
            count += n_bad
        out.append((what, count, example))
    return out


def check_values(comm, path, meta: SimulationMeta, ic, lagr, pos, f_true, halo_pos) -> None:
    """Refuse, on every rank with the same message naming the file, values that the pipeline cannot
    use: NaN in the initial density, NaN or out-of-box positions, lattice indices outside [0, ppd),
    bad planted weights (collective: one allgather of a few counts)."""
    per_rank = comm.allgather(_value_problems(meta, ic, lagr, pos, f_true, halo_pos))
    problems = []
    for i, (what, _, _) in enumerate(per_rank[0]):
        count = sum(r[i][1] for r in per_rank)
        if count:
            example = next(r[i][2] for r in per_rank if r[i][1])
            problems.append(f"{count} {what} (e.g. {example})")
    if problems:
        raise SimulationFileError(f"{path}: " + "; ".join(problems))


def load_simulation(comm, path: str | os.PathLike, with_halos: bool = True) -> LocalSimulation:
    """Read a simulation file: each rank gets its IC slab and a balanced share of particles and halos."""
    path = Path(path)
    meta = read_meta(path)  # refuses a file that does not fit the schema
    with open_h5(path, "r") as f:
        s0, s1 = slab_bounds(meta.n_ic, comm.size, comm.rank)
        ic = f["ic/delta"][s0:s1].astype(np.float32, copy=False)
        lo, hi = row_range(meta.n_particles, comm)
        lagr = f["particles/lagr_index"][lo:hi].astype(np.int32, copy=False)
        pos = f["particles/pos"][lo:hi].astype(np.float32, copy=False)
        f_true = f["planted/f_true"][lo:hi].astype(np.float32, copy=False) if "planted/f_true" in f else None
        if with_halos and "halos/pos" in f:
            hlo, hhi = row_range(meta.n_halos, comm)
            hpos = f["halos/pos"][hlo:hhi].astype(np.float32)
            hn = f["halos/npart"][hlo:hhi].astype(np.int64)
        else:
            hpos, hn = np.zeros((0, 3), np.float32), np.zeros(0, np.int64)
    check_values(comm, path, meta, ic, lagr, pos, f_true, hpos)
    return LocalSimulation(meta, ic, s0, lagr, pos, hpos, hn, f_true)


def _offsets(comm, n_local: int) -> tuple[int, int]:
    """(global offset of this rank's rows, global total)."""
    counts = comm.allgather(int(n_local))
    return int(sum(counts[: comm.rank])), int(sum(counts))


def write_simulation(comm, path: str | os.PathLike, sim: LocalSimulation, config: dict | None = None,
                     f_true_attrs: dict | None = None, vel: np.ndarray | None = None) -> None:
    """Write a simulation file collectively and atomically: rank 0 creates it under a temporary
    name, every rank writes its rows in turn at its global offset, rank 0 renames it."""
    path = Path(path)
    meta = sim.meta
    p_off, p_tot = _offsets(comm, len(sim.pos))
    h_off, h_tot = _offsets(comm, len(sim.halo_pos))
    if p_tot != meta.n_particles:
        raise ValueError(f"writing {p_tot} particles but meta says {meta.n_particles}")
    tmp = path.with_name(f".{path.name}.tmp")
    if comm.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open_h5(tmp, "w") as f:
            a = f.attrs
            a["format"], a["format_version"] = FORMAT, FORMAT_VERSION
            a["box"], a["ppd"], a["n_ic"] = meta.box, meta.ppd, meta.n_ic
            a["z_ic"], a["redshift"], a["particle_mass"] = meta.z_ic, meta.redshift, meta.particle_mass
            a["cosmology_name"], a["cosmology"] = meta.cosmology_name, json.dumps(meta.cosmology)
            a["seed"] = -1 if meta.seed is None else int(meta.seed)
            a["kind"], a["n_particles"], a["n_halos"] = meta.kind, p_tot, h_tot
            a["code_version"], a["config"] = __version__, json.dumps(config or {})
            f.create_dataset("ic/delta", (meta.n_ic,) * 3, dtype="f4")
            f.create_dataset("particles/lagr_index", (p_tot, 3), dtype="i4")
            f.create_dataset("particles/pos", (p_tot, 3), dtype="f4")
            if vel is not None:
                f.create_dataset("particles/vel", (p_tot, 3), dtype="f4")
            f.create_dataset("halos/pos", (h_tot, 3), dtype="f4")
            f.create_dataset("halos/npart", (h_tot,), dtype="i8")
            f.create_dataset("halos/mass", (h_tot,), dtype="f8")
            if sim.f_true is not None:
                d = f.create_dataset("planted/f_true", (p_tot,), dtype="f4")
                for k, v in (f_true_attrs or {}).items():
                    d.attrs[k] = v if not isinstance(v, (dict, list)) else json.dumps(v)
    comm.Barrier()
    for r in range(comm.size):
        if r == comm.rank:
            with open_h5(tmp, "r+") as f:
                n, nh = len(sim.pos), len(sim.halo_pos)
                f["ic/delta"][sim.ic_start: sim.ic_start + sim.ic_delta.shape[0]] = sim.ic_delta
                f["particles/lagr_index"][p_off: p_off + n] = sim.lagr_index
                f["particles/pos"][p_off: p_off + n] = sim.pos
                if vel is not None:
                    f["particles/vel"][p_off: p_off + n] = vel
                f["halos/pos"][h_off: h_off + nh] = sim.halo_pos
                f["halos/npart"][h_off: h_off + nh] = sim.halo_npart
                f["halos/mass"][h_off: h_off + nh] = sim.halo_npart * meta.particle_mass
                if sim.f_true is not None:
                    f["planted/f_true"][p_off: p_off + n] = sim.f_true
        comm.Barrier()
    if comm.rank == 0:
        os.replace(tmp, path)
    comm.Barrier()
