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

from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
from mpi4py import MPI

from lagbias_mpi.config.abacus import AbacusSource
from lagbias_mpi.core.logs import get_logger
from lagbias_mpi.io.abacus_files import (
    AbacusError,
    AbacusPlan,
    ParticleFile,
    assign_files,
    plan_collectively,
)
from lagbias_mpi.io.simfile import LocalSimulation, SimulationMeta
from lagbias_mpi.mesh.grid import wrap_positions
from lagbias_mpi.mpi.comm import ConsistencyError, global_sum, peak_rss_mb
from lagbias_mpi.mpi.layout import slab_bounds

log = get_logger("abacus")


log = get_logger("abacus")


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
