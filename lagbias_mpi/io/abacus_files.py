"""Discovery and validation of an AbacusSummit simulation's files (directory listing and ASDF trees, never the arrays): an :class:`AbacusPlan`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lagbias_mpi.config.abacus import AbacusSource
from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.io.simfile import SimulationFileError

log = get_logger("abacus")


# Cosmological parameters copied into SimulationMeta.cosmology (header first, then get_meta).
COSMOLOGY_KEYS = ("H0", "Omega_M", "Omega_DE", "Omega_K", "Omega_Smooth", "w0", "wa", "n_s", "A_s",
                  "alpha_s", "omega_b", "omega_cdm", "omega_ncdm", "N_ur", "N_ncdm")


KINDS = ("halo", "field")


class AbacusError(SimulationFileError):
    """An AbacusSummit input is missing or inconsistent; the message names the path and the problem."""


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
    from lagbias_mpi.mpi.root import on_root

    return on_root(comm, validate_abacus_source, source)


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
