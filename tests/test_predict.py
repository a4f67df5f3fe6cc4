"""``python -m lagbias_mpi.predict``: rank-count invariance, agreement with training's evaluation,
the HDF5 layout of model_field.h5 / particles_f.h5, bad input refused before heavy work."""
import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from mpi4py import MPI
from simfixtures import make_simulation, write_config

from lagbias_mpi.config.loader import ConfigError
from lagbias_mpi.io import sources
from lagbias_mpi.io.simfile import SimulationMeta, load_simulation, write_simulation
from lagbias_mpi.io.spectra import read_spectra
from lagbias_mpi.workflows import predict
from lagbias_mpi.workflows.train import run as train_run

WORLD = MPI.COMM_WORLD


def _shared_dir(tmp_path_factory, name):
    return Path(WORLD.bcast(str(tmp_path_factory.mktemp(name)) if WORLD.rank == 0 else None))


def _no_halos_copy(src: Path, dst: Path) -> Path:
    """``src`` rewritten as a FoF-kind simulation without halos (rank 0)."""
    if WORLD.rank == 0 and not dst.exists():
        sim = load_simulation(MPI.COMM_SELF, src)
        m = sim.meta
        sim.meta = SimulationMeta(box=m.box, ppd=m.ppd, n_ic=m.n_ic, redshift=m.redshift, z_ic=m.z_ic,
                                  particle_mass=m.particle_mass, n_particles=m.n_particles, n_halos=0,
                                  cosmology_name=m.cosmology_name, seed=m.seed, kind="fof")
        sim.f_true = None
        sim.halo_pos, sim.halo_npart = np.zeros((0, 3), np.float32), np.zeros(0, np.int64)
        write_simulation(MPI.COMM_SELF, dst, sim)
    WORLD.Barrier()
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small trained run (planted 32^3 box a trains, b validates) and the simulation files."""
    d = _shared_dir(tmp_path_factory, "predict")
    a, b = make_simulation(d / "a.h5", seed=1), make_simulation(d / "b.h5", seed=2)
    other = make_simulation(d / "other.h5", ppd=24, box=96.0, seed=5, kind="halos")
    coarse = make_simulation(d / "coarse.h5", ppd=8, box=128.0, seed=6)
    bare = _no_halos_copy(other, d / "bare.h5")
    cfg = write_config(d / "train.yaml", a, [b], train={"epochs": 2, "ensemble": 2, "dtype": "float64",
                                                        "seed": 3, "bare_steps": 1},
                       run={"log_level": "WARNING", "figures": False})
    run_dir = d / "run"
    train_run(WORLD, cfg, out=run_dir)
    return {"dir": d, "run": run_dir, "a": a, "b": b, "other": other, "coarse": coarse, "bare": bare}


def _predict_config(path: Path, sim_file, **output) -> Path:
    out = {"figures": False}
    out.update(output)
    if WORLD.rank == 0:
        path.write_text(yaml.safe_dump({"simulation": {"file": str(sim_file)}, "output": out,
                                        "run": {"log_level": "WARNING"}}))
    WORLD.Barrier()
    return path


def _wait_for_rank0(comm):
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.01)


@pytest.mark.mpi
def test_reproduces_training_spectra(trained):
    """On the training run's own validation box, predict gives the spectra train wrote."""
    d = trained["dir"]
    cfg = _predict_config(d / f"val{WORLD.size}.yaml", trained["b"], members=True, nmesh=32)
    s = predict.run(WORLD, cfg, trained["run"], out=d / f"val_out{WORLD.size}")
    if WORLD.rank == 0:
        ref = read_spectra(trained["run"] / "spectra.h5")["val"]
        got = read_spectra(d / f"val_out{WORLD.size}" / "spectra.h5")["b"]
        for key in ("k", "modes", "P_h", "P_model_avg", "P_hm_avg", "ratio_avg", "uncorr_avg", "corr_avg",
                    "ratio_members", "P_model_members"):
            assert np.allclose(got[key], ref[key], rtol=1e-9, atol=0, equal_nan=True), key
        assert np.isclose(s["pk_ratio_lowk"], ref["pk_ratio_lowk"], rtol=1e-9)
        train_summary = json.loads((trained["run"] / "summary.json").read_text())
        assert np.isclose(s["pk_ratio_lowk"], train_summary["pk_ratio_lowk_val"], rtol=1e-9)
        on_disk = json.loads((d / f"val_out{WORLD.size}" / "summary.json").read_text())
        comp = on_disk["comparison"]
        for key in ("k", "P_h", "P_model_avg", "P_hm_avg", "uncorr_avg", "corr_avg", "pk_ratio_lowk",
                    "corr_lowk", "uncorr_ratio_lowk"):
            assert key in comp, key
        assert len(on_disk["spectra"]["P_model"]) == len(on_disk["spectra"]["k"])
        # CIC field and CIC-compensated P_model: the same as the comparison's average-f spectrum
        assert np.allclose(on_disk["spectra"]["P_model"], comp["P_model_avg"], rtol=1e-8)
    # same box as training's validation: its moments differ only by the realisation's scatter
    assert s["feature_moments"]["names"] and len(s["feature_moments"]["std_ratio"]) == 6


def _read(path, name):
    with h5py.File(path, "r") as f:
        return f[name][()], dict(f.attrs)


@pytest.mark.mpi
@pytest.mark.parametrize("assignment", ["cic", "ngp"])
def test_rank_invariance_and_hdf5_layout(trained, assignment):
    """model_field.h5 on P ranks equals the COMM_SELF one; it reads back with h5py alone in the
    documented layout and sums to the painted f; particles_f.h5 holds every particle once."""
    d = trained["dir"]
    tag = f"{assignment}{WORLD.size}"
    cfg = _predict_config(d / f"inv{tag}.yaml", trained["other"], assignment=assignment, nmesh=20,
                          particle_f=True, members=True)
    s = predict.run(WORLD, cfg, trained["run"], out=d / f"inv_out{tag}")
    ref = predict.run(MPI.COMM_SELF, cfg, trained["run"], out=d / f"inv_ref{tag}") if WORLD.rank == 0 else None
    _wait_for_rank0(WORLD)
    if WORLD.rank != 0:
        return
    field, attrs = _read(d / f"inv_out{tag}" / "model_field.h5", "field")
    field1, _ = _read(d / f"inv_ref{tag}" / "model_field.h5", "field")
    assert field.shape == (20, 20, 20) and field.dtype == np.float32
    assert np.allclose(field, field1, rtol=1e-6, atol=1e-6)
    for key in ("box", "cell", "assignment", "redshift", "training_config_hash", "source", "n_particles", "sum_f"):
        assert key in attrs, key
    assert attrs["assignment"] == assignment and np.isclose(attrs["cell"], 96.0 / 20)
    assert attrs["training_config_hash"] == s["training_config_hash"] == ref["training_config_hash"]
    n_part = 24**3
    painted = field.sum(dtype=np.float64) * n_part / 20**3
    pid, _ = _read(d / f"inv_out{tag}" / "particles_f.h5", "pid")
    f, _ = _read(d / f"inv_out{tag}" / "particles_f.h5", "f")
    fm, _ = _read(d / f"inv_out{tag}" / "particles_f.h5", "f_members")
    assert np.isclose(painted, attrs["sum_f"], rtol=1e-5)
    assert np.isclose(f.sum(dtype=np.float64), attrs["sum_f"], rtol=1e-5)
    assert np.array_equal(np.sort(pid), np.arange(n_part)) and f.dtype == np.float32
    assert fm.shape == (2, n_part) and np.allclose(fm.mean(axis=0), f, rtol=1e-5)
    pid1, _ = _read(d / f"inv_ref{tag}" / "particles_f.h5", "pid")
    f1, _ = _read(d / f"inv_ref{tag}" / "particles_f.h5", "f")
    assert np.allclose(f[np.argsort(pid)], f1[np.argsort(pid1)], rtol=1e-6)
    assert np.allclose(s["spectra"]["P_model"], ref["spectra"]["P_model"], rtol=1e-6, equal_nan=True)
    # halos present: the comparison exists and is rank-count independent
    assert s["comparison"] is not None
    assert np.isclose(s["pk_ratio_lowk"], ref["pk_ratio_lowk"], rtol=1e-6, equal_nan=True)
    if assignment == "ngp":  # NGP: each cell holds exactly the f of the particles in it
        sim = load_simulation(MPI.COMM_SELF, trained["other"])
        from lagbias_mpi.mesh.grid import cell_index, particle_id

        ci = cell_index(sim.pos, 20, 96.0)
        by_pid = np.empty(n_part)
        by_pid[pid] = f
        w = by_pid[particle_id(sim.lagr_index, 24)]
        hist = np.zeros((20, 20, 20))
        np.add.at(hist, (ci[:, 0], ci[:, 1], ci[:, 2]), w)
        assert np.allclose(field, hist * 20**3 / n_part, rtol=1e-5, atol=1e-6)


def _no_heavy_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("heavy work started before the input check")
    monkeypatch.setattr(sources, "load", refuse)


@pytest.mark.mpi
def test_bad_input_refused_before_work(trained, monkeypatch):
    d = trained["dir"]
    _no_heavy_work(monkeypatch)
    cfg = _predict_config(d / f"bad{WORLD.size}.yaml", trained["other"])
    empty = d / f"empty_run{WORLD.size}"
    if WORLD.rank == 0:
        empty.mkdir(exist_ok=True)
    WORLD.Barrier()
    with pytest.raises(ConfigError, match="no trained model"):
        predict.run(WORLD, cfg, empty)
    cfg = _predict_config(d / f"bare{WORLD.size}.yaml", trained["bare"], compare="require")
    with pytest.raises(ConfigError, match="has no halos"):
        predict.run(WORLD, cfg, trained["run"])
    cfg = _predict_config(d / f"coarse{WORLD.size}.yaml", trained["coarse"])
    with pytest.raises(ConfigError, match="below the IC grid spacing"):
        predict.run(WORLD, cfg, trained["run"])
    with pytest.raises(ConfigError, match="output.assignment"):
        predict.run(WORLD, cfg, trained["run"], overrides=["output.assignment=tsc"])
    with pytest.raises(ConfigError, match="simulation: give exactly one"):
        predict.run(WORLD, cfg, trained["run"], overrides=[f"simulation.simulate={d / 'x.yaml'}"])


@pytest.mark.mpi
def test_without_halos_and_moment_warning(trained):
    """A box without halos gives P_model only (compare=auto); a tight tolerance names the features."""
    d = trained["dir"]
    cfg = _predict_config(d / f"nohalo{WORLD.size}.yaml", trained["bare"], nmesh=16)
    s = predict.run(WORLD, cfg, trained["run"], overrides=["checks.moment_tolerance=0.000001"],
                    out=d / f"nohalo_out{WORLD.size}")
    assert s["comparison"] is None and s["pk_ratio_lowk"] is None
    assert np.isfinite(s["spectra"]["P_model"][1:]).all()
    mom = s["feature_moments"]
    assert mom["beyond_tolerance"] == mom["names"]  # another box: no moment agrees to 1e-6
    assert np.isclose(s["mean_f"], s["sum_f"] / 24**3)
    if WORLD.rank == 0:
        assert sorted(p.name for p in (d / f"nohalo_out{WORLD.size}").iterdir()) == ["model_field.h5", "summary.json"]


def test_config_refuses_bad_keys(tmp_path):
    from lagbias_mpi.config.predict import load_predict_config

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"simulation": {"file": "x.h5"}}))
    assert load_predict_config(path).output.assignment == "cic"
    for override, message in [("output.foo=1", "output.foo"), ("output.nmesh=1", "output.nmesh must be >= 2"),
                              ("output.compare=maybe", "output.compare"), ("simulation.realisation=2",
                                                                           "need simulation.simulate"),
                              ("checks.moment_tolerance=0", "moment_tolerance")]:
        with pytest.raises(ConfigError, match=message):
            load_predict_config(path, [override])


def test_planner_predict_below_training():
    """The predict memory model: at most training's for the same box (both peak in the features of
    the 2 Gpc/h box at few ranks, where they hold the same arrays), growing with members."""
    from dataclasses import replace

    from lagbias_mpi.hpc.planner import memory_per_rank
    from lagbias_mpi.hpc.predict_plan import predict_memory_per_rank
    from lagbias_mpi.hpc.problem import load_sizes

    root = Path(__file__).resolve().parents[1]
    size = load_sizes(str(root / "configs" / "abacus_base_c000_2gpc.yaml"), ["simulation.abacus.n_ic=1152"])
    for ranks in (1, 64, 480):
        pred = predict_memory_per_rank(size, ranks)
        assert pred["peak_bytes"] <= memory_per_rank(replace(size, n_val=0), ranks)["peak_bytes"]
        assert predict_memory_per_rank(size, ranks, members=True)["peak_bytes"] >= pred["peak_bytes"]
