"""AbacusSummit ingestion (lagbias_mpi.io.abacus) on the real Abacus test output Mini_N64_L32
(tests/data/abacus_Mini_N64_L32: 64^3 particles, 32 Mpc/h, z = 0, no cleaning catalogue) with a
synthetic ic_dens_N64.asdf written here in AbacusSummit layout."""
import glob
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.config.abacus import AbacusSet, AbacusSource
from lagbias_mpi.config.loader import ConfigError, from_dict
from lagbias_mpi.io.abacus import load_abacus
from lagbias_mpi.io.abacus_files import (
    AbacusError,
    assign_files,
    plan_collectively,
    validate_abacus_source,
)
from lagbias_mpi.mesh.grid import wrap_positions
from lagbias_mpi.mpi.comm import gather_slabs

DATA = Path(__file__).resolve().parent / "data"
SIM = "abacus_Mini_N64_L32"
HALO_DIR = DATA / SIM / "halos" / "z0.000"
N_IC, BOX, PPD = 64, 32.0, 64


def ic_grid(n=N_IC, seed=7):
    """The synthetic IC density (a 1 + delta-like field, mean about 1, so the loader must subtract it)."""
    return (1.0 + 0.5 * np.random.default_rng(seed).standard_normal((n, n, n))).astype(np.float32)


def write_ic(path, n=N_IC, compression=None, box=BOX):
    import asdf

    grid = ic_grid(n)
    af = asdf.AsdfFile({"data": {"density": grid},
                        "header": {"BoxSize": box, "InitialRedshift": 99.0, "NP": PPD ** 3}})
    if compression:
        af.set_array_compression(grid, compression)
    af.write_to(str(path))


@pytest.fixture
def ic_root(shared_tmp):
    """An abacus_root with the Mini simulation (symlinked) and ic/<sim>/ic_dens_N64.asdf."""
    world = MPI.COMM_WORLD
    root = shared_tmp / "abacus"
    if world.rank == 0:
        (root / "ic" / SIM).mkdir(parents=True)
        os.symlink(DATA / SIM, root / SIM)
        write_ic(root / "ic" / SIM / f"ic_dens_N{N_IC}.asdf")
        write_ic(root / "ic_blsc.asdf", compression="blsc")
    world.Barrier()
    return root


def source(root, **kw):
    args = dict(abacus_root=str(root), sim_name=SIM, redshift=0.0, cleaned=False)
    args.update(kw)
    return AbacusSource(**args)


def direct_read(subsamples="AB"):
    """Serial reference straight from abacusutils: lattice ids and positions of every particle file,
    and N of every halo."""
    from abacusnbody.data.compaso_halo_catalog import CompaSOHaloCatalog
    from abacusnbody.data.read_abacus import read_asdf

    ids, pos = [], []
    for s in subsamples:
        for kind in ("halo", "field"):
            for rv in sorted(glob.glob(str(HALO_DIR / f"{kind}_rv_{s}" / "*.asdf"))):
                pid = rv.replace("_rv_", "_pid_")
                lagr = read_asdf(pid, load=["lagr_idx"], verbose=False)["lagr_idx"].astype(np.int64)
                ids.append((lagr[:, 0] * PPD + lagr[:, 1]) * PPD + lagr[:, 2])
                pos.append(np.asarray(read_asdf(rv, load=["pos"], verbose=False)["pos"]))
    halos = CompaSOHaloCatalog(str(HALO_DIR), cleaned=False, fields=["N", "x_com"])
    return np.concatenate(ids), np.concatenate(pos), np.asarray(halos.halos["N"])


def flat_id(lagr):
    lagr = lagr.astype(np.int64)
    return (lagr[:, 0] * PPD + lagr[:, 1]) * PPD + lagr[:, 2]


def gathered(comm, arr):
    return np.concatenate(comm.allgather(arr))


# ---------------------------------------------------------------------------------------------
# pure helpers

def test_assign_files_balanced_and_complete():
    sizes = [100, 90, 80, 10, 10, 10, 5, 1]
    owner = assign_files(sizes, 3)
    assert sorted(set(owner)) == [0, 1, 2] and len(owner) == len(sizes)
    load = np.bincount(owner, weights=sizes, minlength=3)
    assert load.max() - load.min() <= max(sizes[3:])  # greedy largest-first: within a small file
    assert np.array_equal(owner, assign_files(sizes, 3))
    assert np.array_equal(assign_files(sizes, 1), np.zeros(len(sizes), int))
    assert len(assign_files([], 4)) == 0


def test_wrap_positions_half_open():
    x = np.array([[-16.0, 16.0, 15.999999], [47.5, -16.000001, 0.0], [15.9999999999, -16.5, 3.25]])
    w = wrap_positions(x, BOX)
    assert w.dtype == np.float32
    assert np.all(w >= -16.0) and np.all(w < 16.0)
    assert w[0, 1] == -16.0 and w[1, 0] == 15.5 and w[0, 2] < 16.0
    assert w[2, 0] == -16.0  # rounds to 16 in float32: folded to -16
    assert w[2, 1] == 15.5 and w[2, 2] == 3.25 and w[0, 0] == -16.0
    out = np.zeros((3, 3), np.float32)
    assert wrap_positions(x, BOX, out=out) is out and np.array_equal(out, w)


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="subsamples"):
        from_dict(AbacusSource, {"abacus_root": "/x", "sim_name": "s", "subsamples": "C"})
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(AbacusSource, {"abacus_root": "/x", "sim_name": "s", "redshfit": 0.5})
    with pytest.raises(ConfigError, match="n_ic"):
        from_dict(AbacusSource, {"abacus_root": "/x", "sim_name": "s", "n_ic": 0})
    with pytest.raises(ConfigError, match="both the training and a validation"):
        from_dict(AbacusSet, {"abacus_root": "/x", "train": "a", "validate": ["a"]})
    s = from_dict(AbacusSet, {"abacus_root": "/r", "train": "a", "validate": ["b", "c"], "redshift": 0.5})
    assert [v.sim_name for v in s.val_sources()] == ["b", "c"]
    assert s.train_source().halo_dir == Path("/r/a/halos/z0.500")
    assert s.train_source().ic_dir == Path("/r/ic/a")
    s = from_dict(AbacusSet, {"abacus_root": "/r/small", "ic_root": "/r/ic/small", "train": "a"})
    assert s.train_source().ic_dir == Path("/r/ic/small/a") and s.val_sources() == []


@pytest.mark.parametrize("name", ["abacus_small_c000.yaml", "abacus_base_c000_2gpc.yaml"])
def test_config_files_parse(name):
    import yaml

    path = Path(__file__).resolve().parent.parent / "configs" / name
    data = yaml.safe_load(path.read_text())
    s = from_dict(AbacusSet, data["simulation"]["abacus"], "simulation.abacus")
    assert s.redshift == 0.5 and s.train.startswith("AbacusSummit_")
    # the whole file is a valid training config
    from lagbias_mpi.config.train import TrainRunConfig

    cfg = from_dict(TrainRunConfig, data)
    assert cfg.simulation.abacus.train == s.train and cfg.halos.min_npart == 151 and cfg.features.radii == (1.0, 2.83, 8.0)


# ---------------------------------------------------------------------------------------------
# reading on 1, 2, 3 ranks

@pytest.mark.mpi
def test_load_matches_direct_read(comm, ic_root):
    sim = load_abacus(comm, source(ic_root))
    meta = sim.meta
    ref_ids, ref_pos, ref_n = direct_read() if comm.rank == 0 else (None, None, None)
    ref_ids, ref_pos, ref_n = comm.bcast((ref_ids, ref_pos, ref_n), root=0)
    assert (meta.kind, meta.box, meta.ppd, meta.n_ic, meta.redshift) == ("abacus", BOX, PPD, N_IC, 0.0)
    assert meta.z_ic == 99.0 and meta.particle_fraction == pytest.approx(0.10)
    assert meta.particle_mass == pytest.approx(1.088239739e10)
    assert meta.cosmology["Omega_M"] == pytest.approx(0.315192) and meta.cosmology["n_s"] == pytest.approx(0.9649)
    # particles: every file particle exactly once, none lost or duplicated, on some rank
    assert sim.lagr_index.dtype == np.int32 and sim.pos.dtype == np.float32
    assert np.all((sim.lagr_index >= 0) & (sim.lagr_index < PPD))
    assert np.all((sim.pos >= -BOX / 2) & (sim.pos < BOX / 2))
    ids = gathered(comm, flat_id(sim.lagr_index))
    pos = gathered(comm, sim.pos)
    assert meta.n_particles == len(ids) == len(ref_ids) == 26284
    assert len(np.unique(ids)) == len(ids)
    order, ref_order = np.argsort(ids), np.argsort(ref_ids)
    assert np.array_equal(ids[order], ref_ids[ref_order])
    d = pos[order] - ref_pos[ref_order]
    d -= BOX * np.round(d / BOX)
    assert np.abs(d).max() < 1e-5
    # the lattice index and final position belong to the same particle: displacements are small
    q = -BOX / 2 + ids_to_lagr(ids) * (BOX / PPD)
    disp = pos - q
    disp -= BOX * np.round(disp / BOX)
    assert np.sqrt(np.mean(disp ** 2)) < 4.0  # a random pairing would give about 9.2 Mpc/h
    # halos: all N > 0 halos of the catalogue, positions in the box
    npart = gathered(comm, sim.halo_npart)
    assert meta.n_halos == len(npart) == len(ref_n) == 381
    assert np.array_equal(np.sort(npart), np.sort(ref_n))
    assert np.all((sim.halo_pos >= -BOX / 2) & (sim.halo_pos < BOX / 2))
    # IC: the gathered slabs are the file's grid minus its mean
    assert sim.ic_delta.dtype == np.float32
    full = gather_slabs(comm, sim.ic_delta)
    grid = ic_grid()
    assert full.shape == (N_IC,) * 3
    np.testing.assert_allclose(full, grid - grid.astype(np.float64).mean(), atol=2e-6)
    assert abs(full.astype(np.float64).mean()) < 1e-6


def ids_to_lagr(ids):
    return np.stack([ids // (PPD * PPD), (ids // PPD) % PPD, ids % PPD], axis=1)


@pytest.mark.mpi
def test_distributed_equals_single_rank(comm, ic_root):
    """Gathered result on comm equals the MPI.COMM_SELF result (as sets: file order differs)."""
    src = source(ic_root, subsamples="A", halo_min_npart=100)
    sim = load_abacus(comm, src)
    ref = load_abacus(MPI.COMM_SELF, src) if comm.rank == 0 else None
    ref = comm.bcast(ref and (flat_id(ref.lagr_index), ref.pos, ref.halo_npart, ref.halo_pos, ref.meta), root=0)
    ids, pos = gathered(comm, flat_id(sim.lagr_index)), gathered(comm, sim.pos)
    assert sim.meta == ref[4]
    assert sim.meta.particle_fraction == pytest.approx(0.03)
    o, ro = np.argsort(ids), np.argsort(ref[0])
    assert np.array_equal(ids[o], ref[0][ro]) and np.array_equal(pos[o], ref[1][ro])
    hn, hp = gathered(comm, sim.halo_npart), gathered(comm, sim.halo_pos)
    assert np.all(hn >= 100) and len(hn) == len(ref[2]) > 0
    key = np.lexsort((hp[:, 0], hn))
    rkey = np.lexsort((ref[3][:, 0], ref[2]))
    assert np.array_equal(hn[key], ref[2][rkey]) and np.array_equal(hp[key], ref[3][rkey])


@pytest.mark.mpi
def test_compressed_ic_read_on_one_rank_and_scattered(comm, ic_root):
    plan = plan_collectively(comm, source(ic_root, ic_file=str(ic_root / "ic_blsc.asdf")))
    assert plan.ic_compression == "blsc" and plan.n_ic == N_IC
    plain = plan_collectively(comm, source(ic_root))
    assert plain.ic_compression is None
    from lagbias_mpi.io.abacus import read_ic_slab

    a, start = read_ic_slab(comm, plan.ic_file, N_IC, plan.ic_compression)
    b, start_b = read_ic_slab(comm, plain.ic_file, N_IC, None)
    assert start == start_b and np.array_equal(a, b)
    assert np.array_equal(gather_slabs(comm, a), ic_grid())


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the path and the problem, before any heavy work

def test_bad_root_and_sim(tmp_path):
    with pytest.raises(AbacusError, match="abacus_root not found: .*nowhere"):
        validate_abacus_source(source(tmp_path / "nowhere"))
    with pytest.raises(AbacusError, match="simulation directory not found: .*NoSuchSim"):
        validate_abacus_source(source(DATA, sim_name="NoSuchSim"))


def test_bad_redshift_lists_available(ic_root):
    with pytest.raises(AbacusError, match=r"redshift 0.5 not in .*z0.500 missing; available: \['z0.000'\]"):
        validate_abacus_source(source(ic_root, redshift=0.5))


def test_missing_subsample(tmp_path):
    """A simulation whose B sub-sample directories are absent."""
    sim = tmp_path / SIM / "halos" / "z0.000"
    sim.mkdir(parents=True)
    for d in HALO_DIR.iterdir():
        if not d.name.endswith("_B"):
            os.symlink(d, sim / d.name)
    root = tmp_path
    (root / "ic" / SIM).mkdir(parents=True)
    write_ic(root / "ic" / SIM / "ic_dens_N64.asdf")
    validate_abacus_source(source(root, subsamples="A"))
    with pytest.raises(AbacusError, match="sub-sample B not present: .*halo_rv_B is missing"):
        validate_abacus_source(source(root, subsamples="AB"))


def test_rv_pid_mismatch(tmp_path):
    sim = tmp_path / SIM / "halos" / "z0.000"
    sim.mkdir(parents=True)
    for d in HALO_DIR.iterdir():
        if d.name != "field_pid_A":
            os.symlink(d, sim / d.name)
    shutil.copytree(HALO_DIR / "field_pid_A", sim / "field_pid_A")
    shutil.copy(HALO_DIR / "field_pid_A" / "field_pid_A_001.asdf", sim / "field_pid_A" / "field_pid_A_000.asdf")
    with pytest.raises(AbacusError, match="field_rv_A_000.asdf has 1646 particles but .*field_pid_A_000.asdf has 1771"):
        validate_abacus_source(source(tmp_path, ic_file=str(tmp_path / "x.asdf")))


def test_bad_ic_files(ic_root, tmp_path):
    with pytest.raises(AbacusError,
                       match=r"IC file not found: .*ic_dens_N128.asdf \(present in .*\['ic_dens_N64.asdf'\]"):
        validate_abacus_source(source(ic_root, n_ic=128))
    write_ic(tmp_path / "ic_dens_N32.asdf", n=32)
    with pytest.raises(AbacusError, match=r"ic_dens_N32.asdf: density grid is 32\^3 but the config says n_ic = 64"):
        validate_abacus_source(source(ic_root, ic_file=str(tmp_path / "ic_dens_N32.asdf"), n_ic=64))
    write_ic(tmp_path / "box.asdf", box=500.0)
    with pytest.raises(AbacusError, match="box.asdf: IC box 500.0 Mpc/h differs from the simulation's 32.0"):
        validate_abacus_source(source(ic_root, ic_file=str(tmp_path / "box.asdf")))
    (tmp_path / "junk.asdf").write_text("not asdf")
    with pytest.raises(AbacusError, match="junk.asdf: cannot be opened as ASDF"):
        validate_abacus_source(source(ic_root, ic_file=str(tmp_path / "junk.asdf")))
    plan = validate_abacus_source(source(ic_root))  # n_ic unset: the single ic_dens_N*.asdf
    assert plan.n_ic == N_IC and plan.n_particles == 26284


def test_small_box_layout(tmp_path):
    """AbacusSummit keeps small boxes in <root>/small/<sim> and their ICs in <root>/ic/small/<sim>."""
    (tmp_path / "small").mkdir()
    os.symlink(DATA / SIM, tmp_path / "small" / SIM)
    (tmp_path / "ic" / "small" / SIM).mkdir(parents=True)
    write_ic(tmp_path / "ic" / "small" / SIM / "ic_dens_N64.asdf")
    plan = validate_abacus_source(source(tmp_path, n_ic=64))
    assert plan.ic_file == str(tmp_path / "ic" / "small" / SIM / "ic_dens_N64.asdf")
    assert plan.halo_files[0].startswith(str(tmp_path / "small" / SIM))


def test_cleaned_without_cleaning_catalogue(ic_root):
    with pytest.raises(AbacusError, match="cleaned halo catalogue requested .* cleaned: false"):
        validate_abacus_source(source(ic_root, cleaned=True))


def write_cleaning(root):
    """A synthetic CompaSO cleaning catalogue: every 4th halo merged (N_total = 0) into the next one.
    Returns the non-zero N_total values."""
    import asdf

    out = root / "cleaning" / SIM / "z0.000" / "cleaned_halo_info"
    out.mkdir(parents=True)
    kept = []
    for path in sorted((HALO_DIR / "halo_info").glob("halo_info_*.asdf")):
        with asdf.open(path) as af:
            n = np.array(af["data"]["N"], dtype=np.uint32)
        total = n.copy()
        total[::4] = 0
        total[1::4] += n[::4][: len(total[1::4])]
        asdf.AsdfFile({"data": {"N_total": total}, "header": {"TimeSliceRedshiftsPrev": [0.1]}}).write_to(
            str(out / f"cleaned_{path.name}"))
        kept.append(total[total > 0])
    return np.concatenate(kept).astype(np.int64)


@pytest.mark.mpi
def test_cleaned_catalogue(comm, ic_root):
    expected = write_cleaning(ic_root) if comm.rank == 0 else None
    expected = comm.bcast(expected, root=0)
    sim = load_abacus(comm, source(ic_root, cleaned=True, subsamples="A"))
    npart = gathered(comm, sim.halo_npart)
    assert sim.meta.n_halos == len(npart) == len(expected) < 381
    assert np.array_equal(np.sort(npart), np.sort(expected))


@pytest.mark.mpi
def test_error_raised_on_every_rank(comm, ic_root):
    with pytest.raises(AbacusError, match="available: \\['z0.000'\\]"):
        load_abacus(comm, source(ic_root, redshift=1.0))


# ---------------------------------------------------------------------------------------------
# end to end: the training command on the Mini simulation for 2 epochs

@pytest.mark.mpi
def test_train_two_epochs_on_mini(comm, ic_root):
    """``lagbias_mpi.train`` on the Mini simulation through the ``simulation.abacus`` config
    section (a second name of the same simulation validates)."""
    import json

    import yaml

    from lagbias_mpi import train

    val_name = "abacus_Mini_val"
    if comm.rank == 0:
        os.symlink(DATA / SIM, ic_root / val_name)
        (ic_root / "ic" / val_name).mkdir()
        os.symlink(ic_root / "ic" / SIM / "ic_dens_N64.asdf", ic_root / "ic" / val_name / "ic_dens_N64.asdf")
    comm.Barrier()
    section = {"abacus_root": str(ic_root), "train": SIM, "validate": [val_name], "redshift": 0.0,
               "cleaned": False, "n_ic": N_IC}
    cfg = {"simulation": {"abacus": section},
           "features": {"scales": "1Rf"},
           "halos": {"min_npart": 151, "weighting": "mass"},
           "grid": {"cell": 4.0, "eval_nmesh": 16, "kmax_lowk": 0.5},
           "sampling": {"frac": 1.0, "batch_size": 30000},
           "train": {"epochs": 2, "ensemble": 1, "bare_steps": 1},
           "run": {"name": "abacus_mini", "log_level": "WARNING"}}
    path = ic_root / "train_mini.yaml"
    if comm.rank == 0:
        path.write_text(yaml.safe_dump(cfg))
    comm.Barrier()
    out = ic_root / "run"
    summary = train.run(comm, path, out=out, base_dir=ic_root)
    assert summary["n_particles"] == 26284 and summary["n_ranks"] == comm.size
    assert len(summary["loss_history"][0]["epoch"]) == 2
    assert np.isfinite(summary["final_train_loss"]) and np.isfinite(summary["final_val_loss"])
    assert 0.2 < summary["mean_f"] < 5.0
    if comm.rank == 0:
        on_disk = json.loads((out / "summary.json").read_text())
        assert on_disk["n_particles"] == 26284
        assert (out / "model.pt").is_file()
