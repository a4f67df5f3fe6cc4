"""The built-in simulation command: files, rank independence, physics checks, planted truth, bad input,
cache reuse. Small sizes (box 64 Mpc/h, 32^3 particles, 64^3 IC grid, 5 PM steps)."""
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.config.loader import ConfigError, config_hash, to_dict
from lagbias_mpi.config.simulate import DEFAULT_CONFIG, load_simulate_config
from lagbias_mpi.io.simfile import load_simulation, read_meta
from lagbias_mpi.mpi.comm import gather_slabs
from lagbias_mpi.nbody.cosmology import CosmologyError
from lagbias_mpi.nbody.run import ensure_simulations, run_simulation
from lagbias_mpi.simulate import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["name=small", "box=64.0", "ppd=32", "n_ic=64", "pm.n_steps=5", "output.figures=false"]


def _shared_dir(tmp_path_factory, name):
    world = MPI.COMM_WORLD
    path = str(tmp_path_factory.mktemp(name)) if world.rank == 0 else None
    return Path(world.bcast(path, root=0))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    comm = MPI.COMM_WORLD
    out = _shared_dir(tmp_path_factory, "sim_small") / "run"
    cfg = load_simulate_config(None, SMALL)
    summary = run_simulation(comm, cfg, out)
    return cfg, out, summary


def _read_sorted(path):
    """All particles of a file sorted by lattice index (small files only)."""
    with h5py.File(path, "r") as f:
        lagr = f["particles/lagr_index"][:].astype(np.int64)
        pos = f["particles/pos"][:]
        ic = f["ic/delta"][:]
        hn = f["halos/npart"][:]
        hpos = f["halos/pos"][:]
        ppd = int(f.attrs["ppd"])
    key = (lagr[:, 0] * ppd + lagr[:, 1]) * ppd + lagr[:, 2]
    order = np.argsort(key)
    return key[order], pos[order], ic, hn, hpos


def _wrap(d, box):
    return d - box * np.round(d / box)


@pytest.mark.mpi
def test_files_and_summary(small_run):
    cfg, out, summary = small_run
    assert [Path(p).name for p in summary["files"]] == ["realisation_0.h5", "realisation_1.h5"]
    for i, p in enumerate(summary["files"]):
        meta = read_meta(p)
        assert (meta.box, meta.ppd, meta.n_ic, meta.kind) == (64.0, 32, 64, "fof")
        assert meta.n_particles == 32**3 and meta.seed == cfg.seed + i
        assert meta.cosmology_name == "AbacusSummit_base_c000_ph000"
        assert meta.particle_mass == pytest.approx(2.77536627e11 * 0.315192 * 2.0**3)
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("pk_ic_ratio", "pk_matter_lowk_ratio", "hmf_ratio", "n_particles", "n_halos", "wall_s",
                "pm_step_s", "peak_rss_mb", "environment", "config"):
        assert key in on_disk, key
    assert on_disk["config_hash"] == config_hash(cfg)
    assert on_disk["environment"]["n_ranks"] == MPI.COMM_WORLD.size
    assert not list(out.glob(".*tmp"))  # nothing half-written left


@pytest.mark.mpi
def test_physics_checks_small(small_run):
    """Initial P(k) = input and final P(k) = linear x D^2 at low k (k < 2.5 k_f here), within the
    sample variance of this small box; momentum conserved."""
    _, _, s = small_run
    for r in s["realisations"]:
        assert r["pk_ic_ratio"] == pytest.approx(1.0, abs=0.3)  # ~80 modes
        assert r["pk_matter_lowk_ratio"] == pytest.approx(1.0, abs=0.35)
        # the same realisation's own IC field cancels the sample variance
        assert r["pk_matter_lowk_ratio_vs_ic"] == pytest.approx(1.0, abs=0.1)
        assert r["momentum_rel"] < 1e-5
        ic = np.array(r["pk_ic"]["ratio"], dtype=float)
        modes = np.array(r["pk_ic"]["modes"], dtype=float)
        pull = (ic - 1) / np.sqrt(2 / modes)
        assert np.all(np.abs(pull) < 4.5)
    assert s["n_halos"][0] > 10


@pytest.mark.mpi
def test_same_particles_on_all_rank_counts(small_run, tmp_path_factory):
    """The gathered particles (sorted by lattice index) and the IC field equal a 1-rank run's."""
    comm = MPI.COMM_WORLD
    cfg, out, _ = small_run
    ref = _shared_dir(tmp_path_factory, "sim_self") / "run"
    if comm.rank == 0:
        run_simulation(MPI.COMM_SELF, cfg, ref)
    comm.Barrier()
    for name in ("realisation_0.h5", "realisation_1.h5"):
        key, pos, ic, hn, _ = _read_sorted(out / name)
        key1, pos1, ic1, hn1, _ = _read_sorted(ref / name)
        np.testing.assert_array_equal(key, np.arange(32**3))
        np.testing.assert_array_equal(key, key1)
        np.testing.assert_allclose(ic, ic1, rtol=0, atol=1e-5 * np.abs(ic1).max())
        assert np.abs(_wrap(pos.astype(np.float64) - pos1, 64.0)).max() < 2e-3  # Mpc/h
        assert np.all((pos >= -32.0) & (pos < 32.0))
        # FoF on (almost) identical particles: the same catalogue up to a member at the edge
        assert abs(len(hn) - len(hn1)) <= 1 and abs(int(hn.sum()) - int(hn1.sum())) <= 5


@pytest.mark.mpi
def test_round_trip_through_load_simulation(comm, small_run):
    _, out, _ = small_run
    path = out / "realisation_0.h5"
    sim = load_simulation(comm, path)
    assert comm.allreduce(len(sim.pos)) == 32**3
    lagr = np.concatenate(comm.allgather(sim.lagr_index)).astype(np.int64)
    pos = np.concatenate(comm.allgather(sim.pos))
    key = (lagr[:, 0] * 32 + lagr[:, 1]) * 32 + lagr[:, 2]
    order = np.argsort(key)
    key0, pos0, ic0, hn0, hpos0 = _read_sorted(path)
    np.testing.assert_array_equal(key[order], key0)
    np.testing.assert_array_equal(pos[order], pos0)
    np.testing.assert_array_equal(gather_slabs(comm, sim.ic_delta), ic0)
    np.testing.assert_array_equal(np.concatenate(comm.allgather(sim.halo_npart)), hn0)
    assert sim.f_true is None and sim.meta.kind == "fof" and sim.meta.n_halos == len(hn0)
    assert np.all(hn0 >= 20) and np.all(np.abs(hpos0) <= 32.0)


@pytest.mark.mpi
def test_planted_variant(comm, tmp_path_factory):
    """f_true is stored, has mean 1, and equals the documented formula recomputed with numpy from the
    stored IC field at idx_ic = round(lagr * N_ic/ppd) mod N_ic."""
    out = _shared_dir(tmp_path_factory, "sim_planted") / "run"
    cfg = load_simulate_config(ROOT / "configs" / "simulate_planted.yaml",
                               SMALL + ["name=planted", "n_realisations=1", "n_ic=32", "ppd=16"])
    run_simulation(comm, cfg, out)
    sim = load_simulation(comm, out / "realisation_0.h5")
    assert sim.meta.kind == "planted" and sim.f_true is not None
    f_all = np.concatenate(comm.allgather(sim.f_true)).astype(np.float64)
    lagr = np.concatenate(comm.allgather(sim.lagr_index)).astype(np.int64)
    assert f_all.mean() == pytest.approx(1.0, rel=1e-5)
    with h5py.File(out / "realisation_0.h5", "r") as f:
        attrs = dict(f["planted/f_true"].attrs)
        ic = f["ic/delta"][:].astype(np.float64)
    assert "exp(b1*nu + b2*nu^2 + c_lap*lam)" in attrs["formula"] and attrs["radius"] == 2.83
    n, box, pc = 32, 64.0, cfg.planted
    k1 = 2 * np.pi * np.fft.fftfreq(n, d=box / n)
    kz = 2 * np.pi * np.fft.rfftfreq(n, d=box / n)
    k2 = k1[:, None, None] ** 2 + k1[None, :, None] ** 2 + kz[None, None, :] ** 2
    wk = np.fft.rfftn(ic) * np.exp(-0.5 * k2 * pc.radius**2)
    std = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    nu = std(np.fft.irfftn(wk, s=ic.shape, axes=(0, 1, 2)))
    lam = std(np.fft.irfftn(-k2 * wk, s=ic.shape, axes=(0, 1, 2)))
    idx = np.rint(lagr * n / 16).astype(np.int64) % n
    v, l_ = nu[idx[:, 0], idx[:, 1], idx[:, 2]], lam[idx[:, 0], idx[:, 1], idx[:, 2]]
    f_ref = np.exp(pc.b1 * v + pc.b2 * v**2 + pc.c_lap * l_)
    np.testing.assert_allclose(f_all, f_ref / f_ref.mean(), rtol=2e-4)


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="n_ic = 100 must be a multiple of ppd = 32"):
        load_simulate_config(None, SMALL + ["n_ic=100"])
    with pytest.raises(ConfigError, match="z_final = 120.0 must be >= 0 and below z_ic = 99.0"):
        load_simulate_config(None, SMALL + ["z_final=120"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_simulate_config(None, SMALL + ["pm.steps=3"])
    cfg = load_simulate_config(None, SMALL + ["cosmology=AbacusSummit_base_c999_ph000"])
    with pytest.raises(CosmologyError, match="unknown cosmology 'AbacusSummit_base_c999_ph000'"):
        run_simulation(MPI.COMM_SELF, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    cfg = load_simulate_config(None, SMALL + ["z_ic=150", "z_final=0.5"])
    with pytest.raises(CosmologyError, match="outside the growth table"):
        run_simulation(MPI.COMM_SELF, cfg, tmp_path / "out")
    # the command line returns 2 with the message logged, and writes nothing
    assert main(["--out", str(tmp_path / "cli"), "--set", "z_final=120"]) == 2
    assert not (tmp_path / "cli").exists()


@pytest.mark.mpi
def test_out_dir_holding_another_simulation_is_refused(comm, small_run):
    cfg, out, _ = small_run
    before = (out / "realisation_0.h5").stat().st_mtime_ns
    other = load_simulate_config(None, SMALL + ["seed=99"])
    with pytest.raises(ConfigError, match="holds a different simulation"):
        run_simulation(comm, other, out)
    assert (out / "realisation_0.h5").stat().st_mtime_ns == before


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.mpi
def test_ensure_simulations_reuses_the_cache(comm, tmp_path_factory):
    root = _shared_dir(tmp_path_factory, "sim_cache")
    cfg = load_simulate_config(None, ["name=tiny", "box=32.0", "ppd=8", "n_ic=16", "pm.n_steps=2",
                                      "n_realisations=1", "output.figures=false"])
    logger = logging.getLogger("lagbias_mpi")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        paths = ensure_simulations(comm, cfg, root)
        assert paths == [root / f"tiny-{config_hash(cfg)}" / "realisation_0.h5"]
        assert paths[0].is_file()
        mtime = paths[0].stat().st_mtime_ns
        assert ensure_simulations(comm, cfg, root) == paths
        assert paths[0].stat().st_mtime_ns == mtime
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any(m.startswith("generating simulation") for m in handler.messages)
    assert any(m.startswith("reusing simulation") for m in handler.messages)


def test_config_files():
    default = load_simulate_config(None)
    assert load_simulate_config(DEFAULT_CONFIG) == default
    assert (default.box, default.ppd, default.n_ic, default.n_realisations) == (200.0, 128, 256, 2)
    assert (default.z_ic, default.z_final, default.pm.n_steps, default.nmesh) == (99.0, 0.5, 20, 256)
    planted = load_simulate_config(ROOT / "configs" / "simulate_planted.yaml")
    diff = {k for k, v in to_dict(planted).items() if to_dict(default)[k] != v}
    assert diff == {"name", "halos"} and planted.halos.kind == "planted"
    big = load_simulate_config(ROOT / "configs" / "simulate_500.yaml")
    assert (big.box, big.n_ic, big.n_ic % big.ppd) == (500.0, 576, 0)


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    tiny = ["name=tiny", "box=32.0", "ppd=8", "n_ic=16", "pm.n_steps=2", "n_realisations=1"]
    argv = ["--config", str(DEFAULT_CONFIG), "--out", str(out)]
    for item in tiny:
        argv += ["--set", item]
    assert main(argv) == 0
    assert (out / "realisation_0.h5").is_file() and (out / "simulate_checks.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["ppd"] == 8 and summary["n_particles"] == 512
    assert main(argv) == 0  # the same config again into the same directory is fine
    assert main(argv[:-1] + ["n_realisations=2"]) == 2  # a different one is refused


@pytest.mark.mpi
def test_ranks_without_particles(comm, tmp_path_factory):
    """ppd 2 on a 4^3 IC grid: on 3 ranks the last IC slab holds no lattice point."""
    out = _shared_dir(tmp_path_factory, "sim_empty") / "run"
    cfg = load_simulate_config(None, ["name=empty", "box=16.0", "ppd=2", "n_ic=4", "pm.n_steps=2",
                                      "n_realisations=1", "output.figures=false"])
    run_simulation(comm, cfg, out)
    key, pos, ic, hn, _ = _read_sorted(out / "realisation_0.h5")
    np.testing.assert_array_equal(key, np.arange(8))
    assert ic.shape == (4, 4, 4) and np.all(np.abs(pos) <= 8.0) and len(hn) == 0
