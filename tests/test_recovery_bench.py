"""The recovery benchmark (``bench --recovery``): replanting reproduces ``simulate``'s own f_true, the
median error is over all ranks' particles, and one tiny case runs end to end into its table."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mpi4py import MPI

from lagbias_mpi.io.simfile import load_simulation
from lagbias_mpi.mesh.grid import particle_id
from lagbias_mpi.analysis import quadratic_fit
from lagbias_mpi.workflows import recovery

ROOT = Path(__file__).resolve().parents[1]
WORLD = MPI.COMM_WORLD
TINY_SIM = ["name=planted_tiny", "box=64.0", "ppd=16", "n_ic=32", "n_realisations=2", "pm.n_steps=3",
            "planted.radius=4.0", "planted.b1=1.2", "planted.b2=0.15", "planted.c_lap=-0.4", "output.figures=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = Path(WORLD.bcast(str(tmp_path_factory.mktemp("recovery")) if WORLD.rank == 0 else None))
    cfg = d / "train.yaml"
    if WORLD.rank == 0:
        cfg.write_text(yaml.safe_dump({
            "simulation": {"simulate": str(ROOT / "configs" / "simulate_planted.yaml"), "simulate_set": TINY_SIM,
                           "cache_dir": str(d / "sims")},
            "features": {"scales": [4.0, 8.0], "kinds": ["delta", "lap"]},
            "grid": {"cell": 8.0, "eval_nmesh": 16, "kmax_lowk": 0.4}, "sampling": {"frac": "auto", "per_cell": 4, "batch_size": 2000},
            "model": {"width": 8, "depth": 2}, "train": {"epochs": 2, "ensemble": 1, "seed": 3, "bare_steps": 1},
            "run": {"log_level": "WARNING", "figures": False}}))
    WORLD.Barrier()
    return d, cfg


@pytest.mark.mpi
def test_median_relative_error_over_all_ranks():
    rng = np.random.default_rng(7)
    f_true = rng.uniform(0.5, 2.0, 1001)
    f = f_true * (1 + rng.normal(0, 0.1, 1001))
    lo, hi = (len(f) * WORLD.rank) // WORLD.size, (len(f) * (WORLD.rank + 1)) // WORLD.size
    got = recovery.median_relative_error(WORLD, f[lo:hi], f_true[lo:hi])
    assert got == pytest.approx(np.median(np.abs(f / f_true - 1)), rel=1e-12)


@pytest.mark.mpi
def test_recovery_errors_over_all_ranks_equal_a_direct_computation():
    """The f_true-weighted median and the quartile medians from uneven shares (rank 0 empty at 3
    ranks) equal the direct numpy computation on all particles."""
    rng = np.random.default_rng(5)
    f_true = np.exp(rng.normal(0, 1.5, 2001))
    f = f_true * np.where(f_true < 1.5, 2.0, 1.0) * (1 + rng.normal(0, 0.02, 2001))  # 60% of the particles, the light ones, 2x off
    cuts = np.linspace(0, 2001, WORLD.size + 1).astype(int)
    if WORLD.size == 3:
        cuts = np.array([0, 0, 700, 2001])
    mine = slice(cuts[WORLD.rank], cuts[WORLD.rank + 1])
    got = recovery.recovery_errors(WORLD, f[mine], f_true[mine])
    err, ratio = np.abs(f / f_true - 1), f / f_true
    order = np.argsort(err)
    cum = np.cumsum(f_true[order])
    assert got["median"] == pytest.approx(np.median(err), rel=1e-12)
    assert got["weighted_median"] == pytest.approx(err[order][np.searchsorted(cum, cum[-1] / 2)], rel=1e-12)
    assert got["weighted_median"] < 0.05 < got["median"]  # the heavy particles are right, half the light ones not
    q = np.quantile(f_true, [0.25, 0.5, 0.75])
    for k, lo, hi in zip(range(4), [-np.inf, *q], [*q, np.inf]):
        sel = (f_true > lo) & (f_true <= hi)
        assert got["quartile_ratio"][k] == pytest.approx(np.median(ratio[sel]), rel=1e-12)
    assert got["quartile_ratio"][0] > 1.5 and abs(got["quartile_ratio"][3] - 1) < 0.02


@pytest.mark.mpi
def test_best_quadratic_is_exact_on_a_quadratic_truth_at_any_rank_count():
    """The floor column's fit: ln f_true = a quadratic of the inputs is recovered to rounding from
    any split of the particles over the ranks (empty ranks included), as from all on one rank; a
    truth outside the inputs' span leaves a residual."""
    rng = np.random.default_rng(11)
    theta = rng.standard_normal((3000, 3))
    coef = rng.normal(0, 0.3, quadratic_fit.quadratic_design(theta[:1]).shape[1])
    f_true = np.exp(quadratic_fit.quadratic_design(theta) @ coef)
    if WORLD.size == 1:
        mine = np.arange(3000)
    else:  # rank 0 holds no particle, the others uneven shares
        mine = np.array_split(np.arange(3000), WORLD.size - 1)[WORLD.rank - 1] if WORLD.rank else np.arange(0)
    got = quadratic_fit.fit_quadratic_log(WORLD, theta[mine], f_true[mine])
    one = quadratic_fit.fit_quadratic_log(MPI.COMM_SELF, theta, f_true)
    assert np.allclose(got, coef, rtol=0, atol=1e-9) and np.allclose(got, one, rtol=0, atol=1e-11)
    hidden = np.exp(0.5 * rng.standard_normal(3000))  # depends on nothing in theta
    best = np.exp(quadratic_fit.quadratic_design(theta) @ quadratic_fit.fit_quadratic_log(MPI.COMM_SELF, theta, f_true * hidden))
    assert np.median(np.abs(best / (f_true * hidden) - 1)) > 0.2


def test_settings_that_train_alike_are_recognised():
    """On the built-in planted box (~33 particles per 5 Mpc/h cell) the shipped per_cell 50 selects
    every particle, so ``all`` trains as ``shipped``; with AbacusSummit's ~500 per cell it selects the
    paper's 10% and the two differ; ``inputs`` always differs."""
    cfg = ROOT / "configs" / "planted.yaml"
    def eff(extra, n_part):
        return recovery.effective_settings(cfg, recovery.SETTINGS[extra], n_part, 40**3)
    assert eff("shipped", 128**3) == eff("all", 128**3)
    assert eff("shipped", 128**3)["sampling"]["frac"] == 1.0
    assert eff("shipped", 500 * 40**3)["sampling"]["frac"] == pytest.approx(0.1)
    assert eff("shipped", 500 * 40**3) != eff("all", 500 * 40**3)
    assert eff("inputs", 128**3) != eff("shipped", 128**3)


def test_truth_grids():
    assert len(recovery.truths("full")) == 36 and len(recovery.truths("corners")) == 9
    assert (2.0, 0.2, -1.0) in recovery.truths("corners") and recovery.truths("centre") == [recovery.CENTRE]
    with pytest.raises(ValueError, match="--truths"):
        recovery.truths("edges")


@pytest.mark.mpi
def test_runs_and_replants_as_simulate(tiny):
    d, cfg = tiny
    out = d / f"bench{WORLD.size}"
    res = recovery.run(WORLD, out, cfg, which="centre", settings="shipped")
    [row] = res["rows"]
    assert (row["b1"], row["b2"], row["c_lap"], row["settings"]) == (*recovery.CENTRE, "shipped")
    assert np.isfinite(row["pk_ratio_lowk_val"]) and 0 <= row["median_rel_err_val"] < 10
    assert row["passes"] == (abs(row["pk_ratio_lowk_val"] - 1) <= 0.02 and row["median_rel_err_val"] <= 0.05
                             and abs(row["mean_f"] - 1) <= 1e-3
                             and abs(row["mean_f_val"] / row["mean_f_val_expected"] - 1) <= 1e-3)
    # the validation truth shares the training box's normalisation: the perfect model's mean f there
    assert row["mean_f_val_expected"] == pytest.approx(row["mean_f_true_val"], rel=1e-5)
    if WORLD.rank == 0:
        on_disk = json.loads((out / "recovery.json").read_text())
        assert on_disk["rows"][0]["median_rel_err_val"] == row["median_rel_err_val"]
        assert "| 1.0 | 0.1 | -0.5 | shipped |" in (out / "recovery.md").read_text()
    # replanting the simulation's own truth gives back the f_true that simulate wrote
    src = next((d / "sims").rglob("realisation_0.h5"))
    again = d / f"again{WORLD.size}.h5"
    info = recovery.replant(WORLD, src, again, (1.2, 0.15, -0.4), 4.0)
    assert info["mean"] == pytest.approx(1.0, rel=1e-12)
    a, b = load_simulation(WORLD, src), load_simulation(WORLD, again)
    by_pid = []
    for sim in (a, b):
        pid = np.concatenate(WORLD.allgather(particle_id(sim.lagr_index, sim.meta.ppd)))
        f = np.concatenate(WORLD.allgather(sim.f_true))
        by_pid.append(f[np.argsort(pid)])
    np.testing.assert_allclose(by_pid[1], by_pid[0], rtol=1e-5)
    other = load_simulation(WORLD, out / "b1_1.0_b2_0.1_clap_-0.5" / "train.h5")
    assert WORLD.allreduce(float(other.f_true.astype(np.float64).sum())) == pytest.approx(other.meta.n_particles, rel=1e-5)
