"""AbacusSummit simulations as a simulation source (DESIGN.md section 3), read through abacusutils.

An AbacusSummit simulation directory ``<abacus_root>/<sim_name>/halos/z0.500/`` holds, per
superslab, CompaSO halos (``halo_info/halo_info_NNN.asdf``) and the particle sub-samples A (3 %)
and B (7 %) split into halo and field particles (``{halo,field}_{rv,pid}_{A,B}/*_NNN.asdf``: rvint
positions and bit-packed ids). The initial density is ``<abacus_root>/ic/<sim_name>/ic_dens_N576.asdf``
(``['data']['density']``, the linear overdensity at the initial redshift, element [0,0,0] at
(-L/2, -L/2, -L/2), axes x, y, z).

:func:`validate_abacus_source` checks all of that cheaply (directory and file listing, ASDF trees,
never the arrays) and returns an :class:`AbacusPlan`; :func:`load_abacus` then reads, collectively:

- particles: the rv/pid file pairs of the chosen sub-samples, halo and field, are shared among the
  ranks (balanced by bytes, each pair read by exactly one rank) with
  ``abacusnbody.data.read_abacus.read_asdf``; positions wrapped into [-L/2, L/2) float32, lattice
  index ``lagr_idx`` (in [0, ppd)) unpacked from the ids. The halo particle files hold every L0 halo
  particle, so halo + field files are the whole sub-sample, each particle once (reading the halo
  particles through ``CompaSOHaloCatalog`` would give only the L1 subset, or duplicates with cleaning).
- halos: the ``halo_info`` files are shared the same way and read with ``CompaSOHaloCatalog``
  (fields ``N``, ``x_com``; cleaned catalogues by default); halos with N = 0 (merged away by
  cleaning) are dropped, an optional read-time cut on N or mass saves memory.
- IC density: uncompressed ASDF blocks are memory-mapped and each rank copies only its slab;
  compressed blocks can only be decoded whole, so rank 0 reads the grid (the log says what it
  costs) and sends every rank its slab. The global mean is subtracted (so 1 + delta files work too).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from mpi4py import MPI

from .layout import slab_bounds
from .logs import get_logger
from .parallel import ConsistencyError, global_sum, peak_rss_mb
from .simdata import LocalSimulation, SimulationFileError, SimulationMeta

log = get_logger("abacus")

# Cosmological parameters copied into SimulationMeta.cosmology (header first, then get_meta).
COSMOLOGY_KEYS = ("H0", "Omega_M", "Omega_DE", "Omega_K", "Omega_Smooth", "w0", "wa", "n_s", "A_s",
                  "alpha_s", "omega_b", "omega_cdm", "omega_ncdm", "N_ur", "N_ncdm")
KINDS = ("halo", "field")


class AbacusError(SimulationFileError):
    """An AbacusSummit input is missing or inconsistent; the message names the path and the problem."""


@dataclass(frozen=True)
class AbacusSource:
    """One AbacusSummit simulation at one redshift.

    ``abacus_root`` holds ``<sim_name>/halos/z{redshift:.3f}/`` (or ``small/<sim_name>/...``, as
    AbacusSummit lays out its small boxes); ``ic_root`` (default ``<abacus_root>/ic``, or its
    ``small/``) holds ``<sim_name>/ic_dens_N{n_ic}.asdf``, the default ``ic_file`` (with
    ``n_ic`` unset: the single, or else the smallest, ``ic_dens_N*.asdf`` there). ``halo_min_npart`` /
    ``halo_min_mass`` [Msun/h] only cut halos at read time to save memory; the true-field selection
    is the training config's. ``cleaned`` loads the CompaSO cleaning catalogues (abacusutils'
    recommendation), looked for upwards of the halo directory or in ``cleaning_dir``.
    """

    abacus_root: str
    sim_name: str
    redshift: float = 0.5
    subsamples: Literal["A", "B", "AB"] = "AB"
    cleaned: bool = True
    cleaning_dir: Optional[str] = None
    ic_root: Optional[str] = None
    ic_file: Optional[str] = None
    n_ic: Optional[int] = None
    halo_min_npart: int = 1
    halo_min_mass: Optional[float] = None

    def __post_init__(self):
        if not self.abacus_root:
            raise ValueError("abacus_root must name the directory holding the simulations")
        if not self.sim_name or "/" in self.sim_name:
            raise ValueError(f"sim_name must be a simulation directory name, got {self.sim_name!r}")
        if not self.redshift >= 0:
            raise ValueError(f"redshift must be >= 0, got {self.redshift}")
        if self.n_ic is not None and self.n_ic < 1:
            raise ValueError(f"n_ic must be >= 1, got {self.n_ic}")
        if self.halo_min_npart < 1:
            raise ValueError(f"halo_min_npart must be >= 1, got {self.halo_min_npart}")
        if self.halo_min_mass is not None and not self.halo_min_mass > 0:
            raise ValueError(f"halo_min_mass must be > 0 Msun/h, got {self.halo_min_mass}")

    @property
    def sim_dir(self) -> Path:
        """``<abacus_root>/<sim_name>``, or ``<abacus_root>/small/<sim_name>`` (AbacusSummit's
        layout of the small boxes) when only that exists."""
        return _first_dir(Path(self.abacus_root) / self.sim_name,
                          Path(self.abacus_root) / "small" / self.sim_name)

    @property
    def halo_dir(self) -> Path:
        return self.sim_dir / "halos" / f"z{self.redshift:.3f}"

    @property
    def ic_dir(self) -> Path:
        """``<ic_root>/<sim_name>``; by default ``<abacus_root>/ic/<sim_name>`` or, when only that
        exists, ``<abacus_root>/ic/small/<sim_name>``."""
        if self.ic_root is not None:
            return Path(self.ic_root) / self.sim_name
        ic = Path(self.abacus_root) / "ic"
        return _first_dir(ic / self.sim_name, ic / "small" / self.sim_name)


def _first_dir(*candidates: Path) -> Path:
    """The first existing directory of ``candidates``, else the first."""
    return next((p for p in candidates if p.is_dir()), candidates[0])


@dataclass(frozen=True)
class AbacusSet:
    """Config section for a training run on AbacusSummit: one ``abacus_root`` (and ``ic_root``),
    the training simulation and the validation simulations, with the options shared by all of them
    (see :class:`AbacusSource`)."""

    abacus_root: str
    train: str
    validate: tuple[str, ...] = ()
    redshift: float = 0.5
    subsamples: Literal["A", "B", "AB"] = "AB"
    cleaned: bool = True
    cleaning_dir: Optional[str] = None
    ic_root: Optional[str] = None
    n_ic: Optional[int] = 576
    halo_min_npart: int = 1

    def __post_init__(self):
        if self.train in self.validate:
            raise ValueError(f"{self.train} is both the training and a validation simulation")
        for name in (self.train, *self.validate):
            self.source(name)

    def source(self, sim_name: str) -> AbacusSource:
        """The :class:`AbacusSource` of one simulation of the set."""
        return AbacusSource(abacus_root=self.abacus_root, sim_name=sim_name, redshift=self.redshift,
                            subsamples=self.subsamples, cleaned=self.cleaned,
                            cleaning_dir=self.cleaning_dir, ic_root=self.ic_root, n_ic=self.n_ic,
                            halo_min_npart=self.halo_min_npart)

    def train_source(self) -> AbacusSource:
        return self.source(self.train)

    def val_sources(self) -> list[AbacusSource]:
        return [self.source(name) for name in self.validate]


@dataclass(frozen=True)
class ParticleFile:
    """One rv/pid file pair of a sub-sample."""

    subsample: str  # "A" or "B"
    kind: str  # "halo" or "field"
    rv: str
    pid: str
    rows: int
    nbytes: int


@dataclass(frozen=True)
class AbacusPlan:
    """Everything :func:`load_abacus` needs, found by :func:`validate_abacus_source` (picklable)."""

    source: AbacusSource
    header: dict  # selected simulation header values
    halo_files: tuple[str, ...]
    halo_bytes: tuple[int, ...]
    halo_rows: int  # halos in the catalogue files, before any cut
    particle_files: tuple[ParticleFile, ...]
    ic_file: str
    n_ic: int
    ic_dtype: str
    ic_compression: Optional[str]
    z_ic: float
    cosmology: dict = field(default_factory=dict)
    cosmology_name: str = "unknown"

    @property
    def n_particles(self) -> int:
        return sum(p.rows for p in self.particle_files)


# ------------------------------------------------------------------------------------------------
# validation (cheap: listings and ASDF trees, no arrays)

def _asdf_open(path: Path):
    import asdf

    try:
        return asdf.open(path, lazy_load=True, memmap=False)
    except Exception as exc:  # noqa: BLE001 - asdf raises many types for a bad file
        raise AbacusError(f"{path}: cannot be opened as ASDF ({type(exc).__name__}: {exc})") from None


def _data_column(path: Path, names: tuple[str, ...]):
    """(column name, shape) of the data array of an Abacus ASDF file, from its tree only."""
    with _asdf_open(path) as af:
        data = af.tree.get("data", {})
        for name in names:
            if name in data:
                return name, tuple(data[name].shape)
    raise AbacusError(f"{path}: none of the data columns {list(names)} found")


def _available_redshifts(sim_dir: Path) -> list[str]:
    halos = sim_dir / "halos"
    return sorted(p.name for p in halos.glob("z*") if p.is_dir()) if halos.is_dir() else []


def _superslab(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[-1])


def _list_particle_files(halo_dir: Path, subsample: str, kind: str, slabs: list[int]) -> list[ParticleFile]:
    rv_dir, pid_dir = halo_dir / f"{kind}_rv_{subsample}", halo_dir / f"{kind}_pid_{subsample}"
    for d in (rv_dir, pid_dir):
        if not d.is_dir():
            present = sorted(p.name for p in halo_dir.iterdir() if p.is_dir() and "_rv_" in p.name)
            raise AbacusError(f"sub-sample {subsample} not present: {d} is missing "
                              f"(particle directories present: {present})")
    out = []
    rv_files = {_superslab(p): p for p in rv_dir.glob(f"{kind}_rv_{subsample}_*.asdf")}
    pid_files = {_superslab(p): p for p in pid_dir.glob(f"{kind}_pid_{subsample}_*.asdf")}
    extra = sorted(set(rv_files) - set(slabs))
    if extra:
        raise AbacusError(f"{rv_dir}: superslab file(s) {extra} have no halo_info file (incomplete copy?)")
    for s in slabs:
        if s not in rv_files or s not in pid_files:
            missing = rv_dir if s not in rv_files else pid_dir
            raise AbacusError(f"{missing}: file for superslab {s:03d} missing (halo_info has it)")
        _, rv_shape = _data_column(rv_files[s], ("rvint",))
        _, pid_shape = _data_column(pid_files[s], ("packedpid", "pid"))
        rows = int(np.prod(rv_shape)) // 3
        if pid_shape[0] != rows:
            raise AbacusError(f"{rv_files[s]} has {rows} particles but {pid_files[s]} has "
                              f"{pid_shape[0]} ids")
        out.append(ParticleFile(subsample, kind, str(rv_files[s]), str(pid_files[s]), rows,
                                rv_files[s].stat().st_size + pid_files[s].stat().st_size))
    return out


def _check_cleaning(source: AbacusSource, halo_files: list[Path]) -> None:
    """Fail early when the cleaned catalogue is asked for and its files are not there (uses
    abacusutils' own lookup, so the check and the reader agree)."""
    from abacusnbody.data.compaso_halo_catalog import CompaSOHaloCatalog

    try:
        CompaSOHaloCatalog._setup_file_paths(object.__new__(CompaSOHaloCatalog),
                                             [str(p) for p in halo_files], cleaned=True,
                                             cleandir=source.cleaning_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise AbacusError(f"cleaned halo catalogue requested for {source.halo_dir} but: {exc} "
                          f"(set cleaning_dir, or cleaned: false for the raw CompaSO halos)") from None


def _header_values(path: Path) -> dict:
    with _asdf_open(path) as af:
        header = dict(af.tree.get("header", {}))
    need = ("BoxSizeHMpc", "NP", "ParticleMassHMsun", "Redshift")
    missing = [k for k in need if k not in header and not (k == "BoxSizeHMpc" and "BoxSize" in header)]
    if missing:
        raise AbacusError(f"{path}: header lacks {missing}")
    keep = {}
    for k, v in header.items():
        if isinstance(v, (bool, int, float, str)):
            keep[k] = v
        elif isinstance(v, (np.integer, np.floating)):
            keep[k] = v.item()
    return keep


def _cosmology(header: dict, sim_name: str) -> tuple[dict, str]:
    """Cosmological parameters from the header, completed by abacusutils' metadata of the same
    cosmology (``cNNN``) where the header lacks them; and a cosmology name."""
    cosmo = {k: float(header[k]) for k in COSMOLOGY_KEYS if k in header}
    label = re.search(r"_c(\d{3})_", "_".join(["", header.get("SimName", ""), sim_name, ""]))
    label = label or re.search(r"abacus_cosm(\d{3})", str(header.get("ZD_Pk_filename", "")))
    name = f"c{label.group(1)}" if label else "unknown"
    candidates = [header.get("SimName", ""), sim_name]
    if label:
        candidates += [f"AbacusSummit_base_{name}_ph000", f"AbacusSummit_small_{name}_ph3000"]
    missing = [k for k in COSMOLOGY_KEYS if k not in cosmo]
    if missing:
        from abacusnbody.metadata import get_meta

        for cand in candidates:
            try:
                meta = get_meta(cand)
            except ValueError:
                continue
            cosmo.update({k: float(meta[k]) for k in missing if k in meta})
            cosmo["metadata_from"] = cand
            break
    if "H0" in cosmo:
        cosmo["h"] = cosmo["H0"] / 100.0
    cosmo["name"] = name
    return cosmo, name


def _find_ic_file(source: AbacusSource) -> Path:
    if source.ic_file is not None:
        path = Path(source.ic_file)
        if not path.is_file():
            raise AbacusError(f"IC file not found: {path}")
        return path
    if source.n_ic is not None:
        path = source.ic_dir / f"ic_dens_N{source.n_ic}.asdf"
        if not path.is_file():
            present = sorted(p.name for p in source.ic_dir.glob("ic_dens_N*.asdf")) if source.ic_dir.is_dir() else []
            raise AbacusError(f"IC file not found: {path} (present in {source.ic_dir}: {present or 'none'})")
        return path
    if not source.ic_dir.is_dir():
        raise AbacusError(f"IC directory not found: {source.ic_dir} (or give ic_file)")
    found = {int(m.group(1)): p for p in source.ic_dir.glob("ic_dens_N*.asdf")
             if (m := re.fullmatch(r"ic_dens_N(\d+)\.asdf", p.name))}
    if not found:
        raise AbacusError(f"no ic_dens_N*.asdf in {source.ic_dir}")
    return found[min(found)]


def _ic_info(path: Path, source: AbacusSource, box: float):
    """(n_ic, dtype, compression, header) of an IC density file, from its tree only."""
    with _asdf_open(path) as af:
        try:
            arr = af.tree["data"]["density"]
        except (KeyError, TypeError):
            raise AbacusError(f"{path}: no ['data']['density'] array") from None
        shape, dtype = tuple(arr.shape), str(arr.dtype)
        compression = af.get_array_compression(arr)
        header = dict(af.tree.get("header", {}) or {})
    if len(shape) != 3 or len(set(shape)) != 1:
        raise AbacusError(f"{path}: density has shape {shape}, expected a cube (n, n, n)")
    n = shape[0]
    if source.n_ic is not None and n != source.n_ic:
        raise AbacusError(f"{path}: density grid is {n}^3 but the config says n_ic = {source.n_ic}")
    ic_box = header.get("BoxSizeHMpc", header.get("BoxSize"))
    if ic_box is not None and not np.isclose(float(ic_box), box, rtol=1e-6):
        raise AbacusError(f"{path}: IC box {float(ic_box)} Mpc/h differs from the simulation's {box}")
    if compression is None and path.stat().st_size < n ** 3 * np.dtype(dtype).itemsize:
        raise AbacusError(f"{path}: file is {path.stat().st_size} bytes, too small for an "
                          f"uncompressed {n}^3 {dtype} grid (truncated?)")
    return n, dtype, (str(compression) if compression else None), header


def validate_abacus_source(source: AbacusSource) -> AbacusPlan:
    """Check an AbacusSummit source cheaply (no particle or grid is read) and return the read plan.

    Raises :class:`AbacusError` naming the path and the problem: missing directory or file,
    redshift not in the simulation (the available ones are listed), sub-sample not present,
    rv/pid files that disagree, IC file missing or of the wrong size, cleaning files missing.
    """
    root, sim_dir, halo_dir = Path(source.abacus_root), source.sim_dir, source.halo_dir
    if not root.is_dir():
        raise AbacusError(f"abacus_root not found: {root}")
    if not sim_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())[:20]
        raise AbacusError(f"simulation directory not found: {sim_dir} (in {root}: {present})")
    if not halo_dir.is_dir():
        raise AbacusError(f"redshift {source.redshift} not in {sim_dir}: {halo_dir} missing; "
                          f"available: {_available_redshifts(sim_dir) or 'none'}")
    halo_files = sorted((halo_dir / "halo_info").glob("halo_info_*.asdf"))
    if not halo_files:
        raise AbacusError(f"no halo_info files in {halo_dir / 'halo_info'}")
    slabs = [_superslab(p) for p in halo_files]
    header = _header_values(halo_files[0])
    if not np.isclose(float(header["Redshift"]), source.redshift, atol=1e-6):
        raise AbacusError(f"{halo_files[0]}: header redshift {header['Redshift']} is not the "
                          f"requested {source.redshift}")
    halo_rows = sum(_data_column(p, ("N",))[1][0] for p in halo_files)
    if source.cleaned:
        _check_cleaning(source, halo_files)
    particle_files = []
    for s in source.subsamples:
        frac = header.get(f"ParticleSubsample{s}")
        if frac is not None and not float(frac) > 0:
            raise AbacusError(f"sub-sample {s} not present: header ParticleSubsample{s} = {frac}")
        for kind in KINDS:
            particle_files += _list_particle_files(halo_dir, s, kind, slabs)
    box = float(header.get("BoxSizeHMpc", header.get("BoxSize")))
    ic_path = _find_ic_file(source)
    n_ic, ic_dtype, compression, ic_header = _ic_info(ic_path, source, box)
    z_ic = float(ic_header.get("InitialRedshift", header.get("InitialRedshift", float("nan"))))
    cosmology, cosmology_name = _cosmology(header, source.sim_name)
    return AbacusPlan(source=source, header=header, halo_files=tuple(str(p) for p in halo_files),
                      halo_bytes=tuple(p.stat().st_size for p in halo_files), halo_rows=int(halo_rows),
                      particle_files=tuple(particle_files), ic_file=str(ic_path), n_ic=n_ic,
                      ic_dtype=ic_dtype, ic_compression=compression, z_ic=z_ic,
                      cosmology=cosmology, cosmology_name=cosmology_name)


def plan_collectively(comm, source: AbacusSource) -> AbacusPlan:
    """Validate on rank 0 and broadcast the plan; every rank raises the same error if it fails."""
    from .sources import on_root

    return on_root(comm, validate_abacus_source, source)


# ------------------------------------------------------------------------------------------------
# reading

def assign_files(nbytes, size: int) -> np.ndarray:
    """Rank of every file: largest first to the least loaded rank (ties: lowest rank). Pure."""
    nbytes = np.asarray(nbytes, dtype=np.int64)
    load = np.zeros(size, dtype=np.int64)
    owner = np.empty(len(nbytes), dtype=np.int64)
    for i in np.argsort(-nbytes, kind="stable"):
        r = int(np.argmin(load))
        owner[i] = r
        load[r] += nbytes[i]
    return owner


def wrap_positions(pos, box: float, out: np.ndarray | None = None) -> np.ndarray:
    """Positions wrapped into [-box/2, box/2) as float32 (into ``out`` if given). Only the few
    entries outside the interval after the float32 cast (e.g. exactly +box/2) are wrapped, in
    float64, so no float64 copy of the whole array is made."""
    half = np.float32(0.5 * box)
    if out is None:
        out = np.empty(np.shape(pos), dtype=np.float32)
    out[...] = pos
    bad = (out >= half) | (out < -half)
    if bad.any():
        x = np.mod(np.asarray(pos, dtype=np.float64)[bad] + 0.5 * box, box) - 0.5 * box
        x = x.astype(np.float32)
        x[x >= half] -= np.float32(box)
        out[bad] = np.maximum(x, -half)
    return out


def read_particle_file(pf: ParticleFile, box: float, ppd: int, lagr_out: np.ndarray | None = None,
                       pos_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lagr_index int32 (n, 3), pos float32 (n, 3) in [-box/2, box/2)) of one rv/pid pair, written
    into ``lagr_out`` / ``pos_out`` when given."""
    from abacusnbody.data.read_abacus import read_asdf

    rv = read_asdf(pf.rv, load=["pos"], verbose=False)
    pid = read_asdf(pf.pid, load=["lagr_idx"], verbose=False, ppd=ppd)
    if len(rv) != len(pid) or len(rv) != pf.rows:
        raise AbacusError(f"{pf.rv} / {pf.pid}: {len(rv)} positions, {len(pid)} ids, "
                          f"{pf.rows} expected")
    idx = np.asarray(pid["lagr_idx"])
    if len(idx) and (idx.min() < 0 or idx.max() >= ppd):
        raise AbacusError(f"{pf.pid}: lagr_idx outside [0, {ppd}): {idx.min()}..{idx.max()}")
    lagr = np.empty((pf.rows, 3), dtype=np.int32) if lagr_out is None else lagr_out
    lagr[...] = idx
    del pid, idx
    return lagr, wrap_positions(np.asarray(rv["pos"]), box, out=pos_out)


def read_halo_file(path: str, cleaned: bool, cleaning_dir: Optional[str]):
    """(N int64, x_com float64 (n, 3)) of one halo_info file through ``CompaSOHaloCatalog``."""
    from abacusnbody.data.compaso_halo_catalog import CompaSOHaloCatalog

    cat = CompaSOHaloCatalog(path, cleaned=cleaned, cleandir=cleaning_dir, fields=["N", "x_com"],
                             subsamples=False)
    return np.asarray(cat.halos["N"], dtype=np.int64), np.asarray(cat.halos["x_com"], dtype=np.float64)


def _read_particles(comm, plan: AbacusPlan, box: float, ppd: int):
    """This rank's share of the sub-sample files, into arrays allocated once (rows known from the plan)."""
    owner = assign_files([p.nbytes for p in plan.particle_files], comm.size)
    mine = [pf for pf, r in zip(plan.particle_files, owner) if r == comm.rank]
    n_local = sum(pf.rows for pf in mine)
    lagr = np.empty((n_local, 3), dtype=np.int32)
    pos = np.empty((n_local, 3), dtype=np.float32)
    at = 0
    for pf in mine:
        read_particle_file(pf, box, ppd, lagr[at: at + pf.rows], pos[at: at + pf.rows])
        at += pf.rows
    n_global = int(global_sum(comm, at))
    if n_global != plan.n_particles:
        raise ConsistencyError(f"read {n_global} particles, the files list {plan.n_particles}")
    return lagr, pos, n_global


def _read_halos(comm, plan: AbacusPlan, box: float, particle_mass: float):
    src = plan.source
    owner = assign_files(plan.halo_bytes, comm.size)
    npart, hpos = [np.zeros(0, np.int64)], [np.zeros((0, 3), np.float64)]
    for path, r in zip(plan.halo_files, owner):
        if r == comm.rank:
            n, x = read_halo_file(path, src.cleaned, src.cleaning_dir)
            npart.append(n)
            hpos.append(x)
    npart, hpos = np.concatenate(npart), np.concatenate(hpos)
    keep = npart >= src.halo_min_npart
    if src.halo_min_mass is not None:
        keep &= npart * particle_mass >= src.halo_min_mass
    n_read = int(global_sum(comm, len(npart)))
    n_kept = int(global_sum(comm, int(keep.sum())))
    log.info(f"halos: {n_read} read from {len(plan.halo_files)} halo_info files, {n_kept} kept "
             f"(N >= {src.halo_min_npart}" + (f", M >= {src.halo_min_mass:.3g} Msun/h)" if
                                              src.halo_min_mass is not None else ")"))
    return npart[keep], wrap_positions(hpos[keep], box), n_kept


def read_ic_slab(comm, path: str, n: int, compression: Optional[str]) -> tuple[np.ndarray, int]:
    """This rank's slab (float32, planes [start, stop) of axis 0) of ``['data']['density']`` and
    its start plane. Uncompressed: memory-mapped, each rank copies its planes. Compressed: rank 0
    decodes the whole grid and sends each rank its slab (one message per rank, planes as the unit)."""
    import asdf

    start, stop = slab_bounds(n, comm.size, comm.rank)
    if compression is None:
        with asdf.open(path, lazy_load=True, memmap=True) as af:
            slab = np.array(af.tree["data"]["density"][start:stop], dtype=np.float32)
        return slab, start
    slab = np.empty((stop - start, n, n), dtype=np.float32)
    plane = MPI.FLOAT.Create_contiguous(n * n).Commit()
    try:
        if comm.rank == 0:
            log.info(f"IC file {path} is {compression}-compressed: decoding it whole on rank 0 "
                     f"({n ** 3 * 4 / 2 ** 20:.0f} MB as float32, more while decoding) and sending slabs")
            with asdf.open(path, lazy_load=True, memmap=False) as af:
                grid = np.asarray(af.tree["data"]["density"][...], dtype=np.float32)
            for r in range(1, comm.size):
                s0, s1 = slab_bounds(n, comm.size, r)
                comm.Send([np.ascontiguousarray(grid[s0:s1]), s1 - s0, plane], dest=r, tag=61)
            slab[...] = grid[start:stop]
            del grid
        elif stop > start:
            comm.Recv([slab, stop - start, plane], source=0, tag=61)
    finally:
        plane.Free()
    return slab, start


def abacus_meta(plan: AbacusPlan) -> SimulationMeta:
    """The metadata of a planned read, without reading (``n_halos`` counts the catalogue rows before
    the read-time cut; :func:`load_abacus` sets the number kept)."""
    h, src = plan.header, plan.source
    ppd = int(round(float(h.get("ppd", round(float(h["NP"]) ** (1 / 3))))))
    if ppd ** 3 != int(h["NP"]):
        raise AbacusError(f"{plan.halo_files[0]}: NP = {h['NP']} is not a cube (ppd {ppd})")
    seed = h.get("ZD_Seed")
    fraction = sum(float(h.get(f"ParticleSubsample{s}", {"A": 0.03, "B": 0.07}[s])) for s in src.subsamples)
    return SimulationMeta(box=float(h.get("BoxSizeHMpc", h.get("BoxSize"))), ppd=ppd, n_ic=plan.n_ic,
                          redshift=float(h["Redshift"]), z_ic=plan.z_ic,
                          particle_mass=float(h["ParticleMassHMsun"]), n_particles=plan.n_particles,
                          n_halos=plan.halo_rows, cosmology_name=plan.cosmology_name,
                          cosmology=dict(plan.cosmology), seed=int(seed) if seed is not None else None,
                          kind="abacus", source=str(src.sim_dir), particle_fraction=fraction)


def load_abacus(comm, source: AbacusSource, plan: AbacusPlan | None = None) -> LocalSimulation:
    """Read an AbacusSummit simulation collectively into the data model (DESIGN.md section 3).

    ``meta.n_particles`` is the global number of loaded sub-sample particles,
    ``meta.particle_fraction`` the nominal fraction of the lattice they are (0.03, 0.07 or 0.10).
    ``plan`` (from :func:`validate_abacus_source`) skips the validation.
    """
    if plan is None:
        plan = plan_collectively(comm, source)
    meta = abacus_meta(plan)
    box, ppd = meta.box, meta.ppd
    log.info(f"AbacusSummit {source.sim_name} z={source.redshift}: box {box} Mpc/h, ppd {ppd}, "
             f"sub-samples {source.subsamples} ({len(plan.particle_files)} files, "
             f"{plan.n_particles} particles), IC {Path(plan.ic_file).name} {plan.n_ic}^3")
    lagr, pos, n_particles = _read_particles(comm, plan, box, ppd)
    halo_npart, halo_pos, n_halos = _read_halos(comm, plan, box, meta.particle_mass)
    ic, ic_start = read_ic_slab(comm, plan.ic_file, plan.n_ic, plan.ic_compression)
    total = global_sum(comm, ic.sum(dtype=np.float64))
    mean = float(total) / plan.n_ic ** 3
    ic -= np.float32(mean)
    sum_sq = sum(float(np.square(plane, dtype=np.float64).sum()) for plane in ic)  # no full float64 copy
    std = float(np.sqrt(global_sum(comm, sum_sq) / plan.n_ic ** 3))
    log.info(f"IC density: global mean {mean:.4g} subtracted, std {std:.4g} (z_ic = {plan.z_ic})")
    log.info(f"loaded {n_particles} particles ({n_particles / ppd ** 3:.4f} of the lattice, nominal "
             f"{meta.particle_fraction}), {n_halos} halos; peak RSS "
             f"{comm.allreduce(peak_rss_mb(), op=MPI.MAX):.0f} MB (max over ranks)")
    return LocalSimulation(meta=replace(meta, n_particles=n_particles, n_halos=n_halos), ic_delta=ic,
                           ic_start=ic_start, lagr_index=lagr, pos=pos, halo_pos=halo_pos,
                           halo_npart=halo_npart, f_true=None)
