"""PCA of grad f: rank-count invariance, recovery of a known direction, the PC0 peak, the command
with re-training on the leading PCs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI
from simfixtures import make_simulation, write_config

from lagbias_mpi import pca
from lagbias_mpi.analysis import pca as analysis_pca
from lagbias_mpi.bias.ensemble import Ensemble, load_ensemble
from lagbias_mpi.bias.model import BiasMLP
from lagbias_mpi.bias.orthogonalise import Orthogonaliser
from lagbias_mpi.io.spectra import read_spectra
from lagbias_mpi.mesh.power import mean_ratio_below

N_IN, N_RAW, N_PART = 4, 6, 6000
DIRECTION = np.array([0.6, -0.48, 0.0, 0.64])  # unit vector in theta space


def _ensemble(one_direction: bool) -> Ensemble:
    """Two members; with ``one_direction`` every member's first layer sees only DIRECTION . theta,
    so f depends on theta through that direction alone."""
    rng = np.random.default_rng(11)
    states = []
    for m in range(2):
        torch.manual_seed(100 + m)
        net = BiasMLP(N_IN, width=8, depth=2).double()
        with torch.no_grad():
            if one_direction:
                net.net[0].weight.copy_(torch.tensor(np.outer(rng.standard_normal(8) * 0.5, DIRECTION)))
            # the output layer starts at zero (f = 1): give it weights so that f varies
            net.net[-1].weight.copy_(torch.tensor(rng.standard_normal(net.net[-1].weight.shape) * 0.3))
        states.append({k: v.float() for k, v in net.state_dict().items()})
    orth = Orthogonaliser(np.random.default_rng(5).standard_normal((N_IN, N_RAW)) * 0.5, np.zeros(N_RAW),
                          np.ones(N_IN))
    names = [f"{k}_R{r:.2f}" for r in (1.0, 2.0) for k in ("delta", "lap", "g2")]
    return Ensemble({"n_in": N_IN, "width": 8, "depth": 2, "activation": "gelu"}, states, orth,
                    (np.zeros(N_RAW), np.ones(N_RAW)), names, (1.0, 2.0), ("delta", "lap", "g2"))


def _particles(comm):
    raw = np.random.default_rng(9).standard_normal((N_PART, N_RAW))
    pid = np.arange(N_PART, dtype=np.uint64)
    mine = (np.arange(N_PART) * 7919) % comm.size == comm.rank  # uneven, interleaved ownership
    return raw, pid, mine


@pytest.mark.mpi
def test_rank_count_invariance(comm):
    ens = _ensemble(False)
    raw, pid, mine = _particles(comm)
    res = analysis_pca.analyse_sample(comm, ens, raw[mine][analysis_pca.sample_mask(pid[mine], N_PART, 3000, 4)])
    ref = analysis_pca.analyse_sample(MPI.COMM_SELF, ens, raw[analysis_pca.sample_mask(pid, N_PART, 3000, 4)])
    assert res["n_sampled"] == ref["n_sampled"]
    assert 2500 < ref["n_sampled"] < 3500
    np.testing.assert_allclose(res["eigenvalues"], ref["eigenvalues"], rtol=1e-10)
    np.testing.assert_allclose(res["U"], ref["U"], atol=1e-8)
    np.testing.assert_allclose(res["coefficients"], ref["U"].T @ ens.orth.matrix, atol=1e-8)
    np.testing.assert_allclose(res["pc0_mean_f"], ref["pc0_mean_f"], rtol=1e-10)
    assert res["pc0_peak"] == pytest.approx(ref["pc0_peak"], rel=1e-10)


@pytest.mark.mpi
def test_leading_pc_is_the_known_direction(comm):
    ens = _ensemble(True)
    raw, pid, mine = _particles(comm)
    res = analysis_pca.analyse_sample(comm, ens, raw[mine][analysis_pca.sample_mask(pid[mine], N_PART, 4000, 1)])
    vals, u0 = res["eigenvalues"], res["U"][:, 0]
    assert vals[0] > 0 and vals[1] < 1e-10 * vals[0]
    assert abs(abs(u0 @ DIRECTION) - 1.0) < 1e-10
    # f increases along PC0 on average by the sign convention
    assert res["pc0_mean_f"][np.isfinite(res["pc0_mean_f"])][-1] > res["pc0_mean_f"][np.isfinite(res["pc0_mean_f"])][0]


@pytest.mark.mpi
def test_pc0_peak_of_rising_and_falling_f(comm):
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal(20000)
    centres, mean, counts = analysis_pca.binned_mean(comm, x, np.exp(-((x - 0.8) ** 2)), n_bins=40)
    assert int(counts.sum()) == 20000 * comm.size
    assert abs(analysis_pca.peak_of(centres, mean) - 0.8) < 0.2


def test_pc_orthogonaliser_projects_on_leading_pcs():
    ens = _ensemble(False)
    U = np.linalg.qr(np.random.default_rng(2).standard_normal((N_IN, N_IN)))[0]
    po = analysis_pca.pc_orthogonaliser(ens.orth, U, np.arange(N_IN, 0, -1.0), 2)
    raw = np.random.default_rng(3).standard_normal((5, N_RAW))
    np.testing.assert_allclose(po.apply(raw), ens.orth.apply(raw) @ U[:, :2], atol=1e-12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lagbias_mpi import train

    world = MPI.COMM_WORLD
    d = Path(world.bcast(str(tmp_path_factory.mktemp("pca")) if world.rank == 0 else None, root=0))
    a = make_simulation(d / "a.h5", ppd=16, box=64.0, seed=3, kind="halos")
    b = make_simulation(d / "b.h5", ppd=16, box=64.0, seed=4, kind="halos")
    cfg = write_config(d / "nn.yaml", a, [b], features={"scales": [8.0, 16.0], "kinds": ["delta", "lap", "g2"]},
                       grid={"cell": 8.0, "eval_nmesh": 16, "kmax_lowk": 0.3},
                       train={"epochs": 1, "ensemble": 2, "lr": 0.01, "seed": 7, "bare_steps": 1})
    train.run(world, cfg, out=d / "run")
    world.Barrier()
    return d / "run"


@pytest.mark.mpi
def test_expected_mean_f_noise_is_the_halos_shot_noise(trained):
    """On halo truths the perfect model's mean f on the validation box carries the two boxes' shot
    noise: hypot of sqrt(sum w^2) / sum w over each box's halos (mass-weighted, every halo kept)."""
    import h5py

    s = json.loads((trained / "summary.json").read_text())
    noise = []
    for name in ("a.h5", "b.h5"):
        with h5py.File(trained.parent / name, "r") as f:
            w = f["halos/npart"][:].astype(np.float64)  # mass = npart x particle mass; the ratio is scale-free
        noise.append(np.sqrt(np.sum(w**2)) / w.sum())
    assert s["mean_f_val_expected_shot_noise"] == pytest.approx(np.hypot(*noise), rel=1e-9)
    assert 0 < s["mean_f_val_expected_shot_noise"] < 1


@pytest.mark.mpi
def test_command_with_retrain(trained):
    world = MPI.COMM_WORLD
    out = trained / f"pca_n{world.size}"
    assert pca.main(["--run", str(trained), "--retrain", "2", "--n-sample", "2000", "--out", str(out),
                     "--set", "train.warmup_steps=2"]) == 0
    world.Barrier()  # rank 0 writes the outputs
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["train"]["warmup_steps"] == 2  # --set reaches the re-training config
    run_summary = json.loads((trained / "summary.json").read_text())
    assert s["pk_ratio_lowk_val_original"] == run_summary["pk_ratio_lowk_val"]  # the trained run's figure
    vals = np.asarray(s["pc_eigenvalues"])
    assert len(vals) == 5 and np.all(np.diff(vals) <= 0) and vals[-1] >= 0  # M is positive semi-definite
    coeffs = np.asarray(s["pc_coefficients"])  # U^T P: PC directions in the standardised raw features
    original = load_ensemble(trained)
    assert coeffs.shape == (5, 6)
    # the re-trained ensemble reads exactly the two leading PCs of the original inputs
    retrained = load_ensemble(out / "retrain_2")
    assert retrained.shape["n_in"] == 2
    np.testing.assert_allclose(retrained.orth.matrix, coeffs[:2], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(retrained.orth.mean, original.orth.mean, rtol=0, atol=0)
    raw = np.random.default_rng(0).standard_normal((50, 6))
    u2 = np.linalg.lstsq(original.orth.apply(raw), retrained.orth.apply(raw), rcond=None)[0]
    np.testing.assert_allclose(u2.T @ u2, np.eye(2), atol=1e-8)  # orthonormal combinations of theta
    # and its low-k ratio is the one of its own validation spectrum (P_model / P_h below kmax_lowk)
    spectra = read_spectra(out / "retrain_2" / "spectra.h5")
    val = next(label for label in spectra if label != "train")
    ratio = spectra[val]["P_model_avg"] / spectra[val]["P_h"]
    assert s["pk_ratio_lowk_val_retrained"] == pytest.approx(
        mean_ratio_below(spectra[val]["k"], ratio, s["config"]["grid"]["kmax_lowk"]), rel=1e-12)
    # the PC0 peak is a PC0 value inside the sampled range, and the run's summary names it too
    assert np.isfinite(s["pc0_peak"]) and run_summary["pc0_peak"] == s["pc0_peak"]
    for name in ("pc_planes", "pc_coefficients", "f_vs_pc0", "retrain_2"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    world.Barrier()


def test_bad_run_directory(tmp_path, capsys):
    assert pca.main(["--run", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


@pytest.mark.mpi
def test_pca_samples_every_training_box(trained):
    """With two training boxes n_sample is split between them: the same box given twice with
    n_sample 2000 samples its 1000-particle set twice, so M and its eigenvalues are exactly twice
    those of the box alone with n_sample 1000."""
    world = MPI.COMM_WORLD
    a = trained.parent / "a.h5"
    one = pca.run(world, trained, n_sample=1000, out=trained / f"pca_one{world.size}")
    two = pca.run(world, trained, n_sample=2000, out=trained / f"pca_two{world.size}",
                  overrides=[f"simulation.train_files=[{a},{a}]"])
    assert two["n_sampled"] == 2 * one["n_sampled"] > 0
    np.testing.assert_allclose(two["pc_eigenvalues"], 2 * np.asarray(one["pc_eigenvalues"]), rtol=1e-10)
    world.Barrier()
