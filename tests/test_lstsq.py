"""Paper I's binned least squares: rank-count invariance, recovery of a planted piecewise-constant f,
the constraints f >= 0 and <f> = 1, and the command end to end."""
import json

import numpy as np
import pytest
import scipy.optimize
from mpi4py import MPI
from simfixtures import make_simulation, write_config

from lagbias_mpi import lstsq
from lagbias_mpi.analysis import lstsq as analysis_lstsq
from lagbias_mpi.config import lstsq as config_lstsq
from lagbias_mpi.mpi.layout import slab_bounds

N_GRID = 8
N_PART = 12000


def _synthetic(comm):
    """All ranks draw the same particles (global ids 0..N-1) and keep those whose cell plane they
    own, as after Eulerian routing. Returns (d, lap, cell, pid) of this rank."""
    rng = np.random.default_rng(42)
    d = rng.standard_normal(N_PART)
    lap = 0.6 * d + 0.8 * rng.standard_normal(N_PART)
    cell = rng.integers(0, N_GRID**3, N_PART)
    pid = np.arange(N_PART, dtype=np.uint64)
    lo, hi = slab_bounds(N_GRID, comm.size, comm.rank)
    mine = (cell // N_GRID**2 >= lo) & (cell // N_GRID**2 < hi)
    return d[mine], lap[mine], cell[mine], pid[mine], (d, lap, cell)


CFG = config_lstsq.LstsqConfig(n_delta=4, n_lap=3, delta_range=(-1.0, 1.0), fine_bins=512)


def _planted(comm):
    """Bins (fitted collectively), a planted f_true >= 0 with <f> = 1, and the exact truth field."""
    d, lap, cell, pid, (d_all, lap_all, cell_all) = _synthetic(comm)
    binning = analysis_lstsq.fit_binning(comm, np.stack([d, lap], 1), (0, 1), CFG)
    b_all = binning.bins(np.stack([d_all, lap_all], 1))
    f_true = np.linspace(0.0, 3.0, binning.n_bins) ** 2
    f_true /= np.bincount(b_all, minlength=binning.n_bins) @ f_true / N_PART
    field = np.bincount(cell_all, weights=f_true[b_all], minlength=N_GRID**3) * (N_GRID**3 / N_PART) - 1.0
    return binning, f_true, field, d, lap, cell, pid


def _solve(comm, binning, field, d, lap, cell, pid, frac, members):
    ne = analysis_lstsq.normal_equations(comm, cell, pid, binning.bins(np.stack([d, lap], 1)), binning.n_bins,
                                lambda c: field[c], N_GRID**3, N_PART, frac, 5, members)
    return ne, analysis_lstsq.solve_all(comm, ne, CFG.constraint_weight)


@pytest.mark.mpi
def test_recovers_planted_piecewise_constant_f(comm):
    binning, f_true, field, d, lap, cell, pid = _planted(comm)
    ne, f = _solve(comm, binning, field, d, lap, cell, pid, frac=1.0, members=1)
    assert ne.n_particles == N_PART
    np.testing.assert_allclose(f[0], f_true, rtol=1e-6, atol=1e-6)
    assert analysis_lstsq.loss_of(ne, 0, f[0]) < 1e-8 * ne.yty[0]


@pytest.mark.mpi
def test_rank_count_invariance(comm):
    """Edges, normal equations and f on P ranks equal the same call on COMM_SELF with all particles."""
    binning, _, field, d, lap, cell, pid = _planted(comm)
    ne, f = _solve(comm, binning, field, d, lap, cell, pid, frac=0.3, members=3)
    _, _, _, _, (d_all, lap_all, cell_all) = _synthetic(comm)
    self_bin = analysis_lstsq.fit_binning(MPI.COMM_SELF, np.stack([d_all, lap_all], 1), (0, 1), CFG)
    np.testing.assert_array_equal(self_bin.l_edges, binning.l_edges)
    ne1, f1 = _solve(MPI.COMM_SELF, self_bin, field, d_all, lap_all, cell_all,
                     np.arange(N_PART, dtype=np.uint64), frac=0.3, members=3)
    np.testing.assert_array_equal(ne1.counts, ne.counts)
    np.testing.assert_allclose(ne.AtA, ne1.AtA, rtol=1e-12, atol=1e-12 * ne1.AtA.max())
    np.testing.assert_allclose(ne.Aty, ne1.Aty, rtol=1e-12)
    np.testing.assert_allclose(f, f1, rtol=1e-7, atol=1e-9)
    assert not np.allclose(f[0], f[1])  # the sub-samples differ


def test_percentile_edges_split_counts_evenly():
    rng = np.random.default_rng(1)
    d = rng.standard_normal(40000)
    lap = rng.standard_normal(40000) * (1 + d**2)
    cfg = config_lstsq.LstsqConfig(n_delta=3, n_lap=5, delta_range=(-0.5, 0.5), fine_bins=4096)
    binning = analysis_lstsq.fit_binning(MPI.COMM_SELF, np.stack([d, lap], 1), (0, 1), cfg)
    counts = np.bincount(binning.bins(np.stack([d, lap], 1)), minlength=15).reshape(3, 5)
    frac = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(frac, 0.2, atol=0.01)


def test_constraints_hold_exactly_and_solution_is_optimal():
    """A target that the unconstrained solution would fit with negative f: f >= 0, <f> = 1 to
    rounding, and the objective no worse than SLSQP's on the same problem."""
    rng = np.random.default_rng(3)
    a = rng.random((300, 10)) * (rng.random((300, 10)) < 0.4)
    y = a @ np.concatenate([[-2.0, 5.0], rng.random(8)]) + 0.1 * rng.standard_normal(300)
    counts = rng.integers(50, 500, 10)
    AtA, Aty = a.T @ a, a.T @ y
    f = analysis_lstsq.solve_constrained(AtA, Aty, counts)
    assert f.min() >= 0.0
    assert f[0] == 0.0
    assert abs(counts @ f / counts.sum() - 1.0) < 1e-13

    def obj(x):
        return x @ AtA @ x - 2 * x @ Aty

    w = counts / counts.sum()
    ref = scipy.optimize.minimize(obj, np.ones(10), jac=lambda x: 2 * (AtA @ x - Aty), method="SLSQP",
                                  bounds=[(0, None)] * 10,
                                  constraints=[{"type": "eq", "fun": lambda x: w @ x - 1.0}],
                                  options={"ftol": 1e-14, "maxiter": 1000})
    assert obj(f) <= ref.fun + 1e-6 * abs(ref.fun)


def test_empty_bins_get_zero():
    AtA = np.diag([2.0, 0.0, 1.0])
    f = analysis_lstsq.solve_constrained(AtA, np.array([2.0, 0.0, 1.0]), np.array([10, 0, 10]))
    assert f[1] == 0.0
    np.testing.assert_allclose(f, [1.0, 0.0, 1.0], rtol=1e-6)


def test_config_refuses_several_scales(tmp_path):
    from lagbias_mpi.config.loader import ConfigError, from_dict

    with pytest.raises(ConfigError, match="one scale"):
        from_dict(config_lstsq.LstsqRunConfig, {"simulation": {"train_files": ["x.h5"]},
                                         "features": {"scales": [2.0, 4.0]}})
    with pytest.raises(ConfigError, match="lstsq.n_lap"):
        from_dict(config_lstsq.LstsqRunConfig, {"simulation": {"train_files": ["x.h5"]}, "lstsq": {"n_lap": 0}})


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    world = MPI.COMM_WORLD
    d = world.bcast(str(tmp_path_factory.mktemp("lstsq")) if world.rank == 0 else None, root=0)
    from pathlib import Path

    d = Path(d)
    a = make_simulation(d / "a.h5", ppd=16, box=64.0, seed=3, kind="halos")
    b = make_simulation(d / "b.h5", ppd=16, box=64.0, seed=4, kind="halos")
    return a, b, d


@pytest.mark.mpi
def test_command_end_to_end_with_nn(sims):
    from lagbias_mpi import train

    a, b, d = sims
    world = MPI.COMM_WORLD
    common = dict(features={"scales": [8.0], "kinds": ["delta", "lap"]},
                  grid={"cell": 8.0, "eval_nmesh": 16, "kmax_lowk": 0.3},
                  train={"epochs": 1, "ensemble": 2, "lr": 0.01, "seed": 7, "bare_steps": 1})
    tag = f"n{world.size}"
    nn_cfg = write_config(d / f"nn_{tag}.yaml", a, [b], **common)
    train.run(world, nn_cfg, out=d / f"nn_{tag}")
    world.Barrier()
    cfg = write_config(d / f"ls_{tag}.yaml", a, [b], lstsq={"n_delta": 5, "n_lap": 3}, **common)
    assert lstsq.main(["--config", str(cfg), "--nn-run", str(d / f"nn_{tag}")]) == 0
    world.Barrier()  # rank 0 writes the outputs
    out = d / f"nn_{tag}" / "lstsq"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_ranks"] == world.size
    assert np.isfinite(summary["pk_ratio_lowk_val_lstsq"]) and np.isfinite(summary["pk_ratio_lowk_val_nn"])
    assert abs(summary["mean_f"] - 1.0) < 1e-9
    assert summary["min_f"] >= 0.0
    assert len(summary["f_bins"]) == 15
    assert (out / "figures" / "lstsq_fig2.png").stat().st_size > 10000
    world.Barrier()


@pytest.mark.parametrize("override, message", [("lstsq.n_delta=0", "lstsq.n_delta"),
                                                ("lstsq.scale=3.0", "not one of features.scales"),
                                                ("lstsq.foo=1", "lstsq.foo")])
def test_bad_input_stops_before_work(sims, capsys, override, message):
    a, b, d = sims
    cfg = write_config(d / "bad.yaml", a, [b], features={"scales": [8.0], "kinds": ["delta", "lap"]})
    out = d / "bad_out"
    assert lstsq.main(["--config", str(cfg), "--set", override, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
