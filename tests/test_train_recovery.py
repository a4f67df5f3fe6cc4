"""Recovery of a planted f_true (the true field is the particles weighted by a known f).

Planted: f_true = exp(b1 nu + b2 nu^2 + c_lap lam), the mild truth (0.5, 0.05, -0.2) with the paper's
squared-error grid term, the spiky truth of the benchmark's centre (1, 0.1, -0.5) with the
shipped configs' Poisson deviance and gradient clipping, and the corner (2, 0.2, 0) with the
full-batch phase after the epochs (with the squared error it misses: P_model/P_h 0.951 measured at
2 ranks), of the density and its Laplacian smoothed at
R = 8 Mpc/h (standardised), 40^3 particles in 160 Mpc/h. Trained on delta, lap, g2 at that scale with
every particle selected (frac 1); an ensemble of 3 small networks (16 x 2), 40 epochs, slower lr decay (0.95)
make it converge in about a minute; the paper's eps_min = 1e-4 (the integral constraint is on the
global mean f and normalised exactly after each epoch, training/loss.py). Criteria of issue #15's
recovery benchmark: P_model/P_h at k < 0.1 within 2% of 1, median |f/f_true - 1| <= 5%, mean f
within 1e-3 of 1.
"""
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI
from simfixtures import make_simulation, write_config

from lagbias_mpi.bias.ensemble import load_ensemble, simulation_particles
from lagbias_mpi.io import sources
from lagbias_mpi.workflows.train import run

WORLD = MPI.COMM_WORLD


MILD, SPIKY, CORNER = (0.5, 0.05, -0.2), (1.0, 0.1, -0.5), (2.0, 0.2, 0.0)


@pytest.mark.parametrize("constraint, grid_loss, truth, clip, polish", [
    ("projection", "mse", MILD, 0.0, 0),
    pytest.param("penalty", "mse", MILD, 0.0, 0, marks=pytest.mark.xfail(
        reason="issue #15 not met with the penalty: measured P_model/P_h 1.024 (train, 2 ranks) against the "
               "2% target with eps_min 1e-4 (mean f and members_ok pass); see docs/results.md", strict=False)),
    ("projection", "poisson", SPIKY, 2.0, 0),  # the shipped configs' training on the benchmark's centre truth
    # the benchmark's spikiest b1, b2 corner with the full-batch phase (train.polish). Measured at 2 ranks,
    # P_model/P_h train / median |f/f_true - 1|: Adam only 0.983 / 6.8% (fails), 20 evaluations 0.998 /
    # 5.3%, 60 evaluations 1.001 / 2.1% (the whole set's deviance down 10-30x per member)
    ("projection", "poisson", CORNER, 2.0, 60),
], ids=["projection_mild", "penalty_mild", "shipped_centre", "shipped_polish_corner"])
@pytest.mark.mpi(min_size=2)
def test_recovery_planted(comm, tmp_path_factory, constraint, grid_loss, truth, clip, polish):
    d = Path(comm.bcast(str(tmp_path_factory.mktemp(f"recovery_{constraint}_{grid_loss}_{polish}"))
                        if comm.rank == 0 else None))
    b1, b2, c_lap = truth
    sim_file = make_simulation(d / "planted.h5", ppd=40, box=160.0, seed=11, b1=b1, b2=b2, c_lap=c_lap)
    cfg = write_config(d / "recovery.yaml", sim_file, [],
                       features={"scales": [8.0]},
                       grid={"cell": 8.0, "eval_nmesh": 40},
                       sampling={"frac": 1.0, "batch_size": 16000},
                       model={"width": 16, "depth": 2},
                       train={"epochs": 40, "ensemble": 3, "lr": 0.03, "lr_decay": 0.95, "eps_min": 1e-4,
                              "seed": 5, "bare_steps": 1, "constraint": constraint, "grid_loss": grid_loss,
                              "clip_grad": clip, "polish": {"evaluations": polish}},
                       run={"log_level": "WARNING", "figures": False})
    s = run(comm, cfg, out=d / "run")
    assert abs(s["pk_ratio_lowk_train"] - 1) < 0.02, s["pk_ratio_lowk_train"]
    assert abs(s["mean_f"] - 1) < 1e-3, s["mean_f"]
    assert all(m["ok"] for m in s["members_ok"]), s["members_ok"]
    if polish:
        assert all(p["set_loss_after"] < 0.5 * p["set_loss_before"] for p in s["polish"]), s["polish"]
    ens = load_ensemble(d / "run")
    sim = sources.load(comm, sources.file_spec(sim_file))
    parts = simulation_particles(comm, sim, ens)
    f = ens.predict_f(parts.raw, standardised=True)
    f_true = parts.f_true.astype(np.float64)
    all_true = np.concatenate(comm.allgather(f_true))
    all_err = np.concatenate(comm.allgather(np.abs(f / f_true - 1)))
    sel = all_true > np.percentile(all_true, 10)
    assert np.median(all_err[sel]) < 0.05, np.median(all_err[sel])
