"""End-to-end training: rank-count invariance, outputs, checkpoint/resume, mass conservation."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI
from simfixtures import make_simulation, write_config
from waits import self_run

from lagbias_mpi.bias.ensemble import load_ensemble
from lagbias_mpi.workflows.train import run

WORLD = MPI.COMM_WORLD


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """(train file, val file) of a 32^3-particle planted simulation, 128 Mpc/h."""
    d = Path(WORLD.bcast(str(tmp_path_factory.mktemp("sims")) if WORLD.rank == 0 else None))
    return make_simulation(d / "a.h5", seed=1), make_simulation(d / "b.h5", seed=2), d


def _self_run(comm, cfg, out, **kw):
    """Run the same config on MPI.COMM_SELF on rank 0 (others wait, bounded); summary broadcast."""
    return self_run(comm, run, cfg, out=out, **kw)


def _probe_raw(n=200):
    """Standardised raw features of n probe particles."""
    return np.random.default_rng(0).standard_normal((n, 6))


@pytest.mark.mpi
def test_rank_count_invariance_and_outputs(comm, sims):
    a, b, d = sims
    cfg = write_config(d / f"inv{comm.size}.yaml", a, [b],
                       train={"epochs": 3, "ensemble": 2, "dtype": "float64", "seed": 7, "bare_steps": 2},
                       run={"log_level": "WARNING", "figures": comm.size == 2})
    out = d / f"inv_run{comm.size}"
    s = run(comm, cfg, out=out)
    ref = _self_run(comm, cfg, d / f"inv_ref{comm.size}", overrides=["run.figures=false"])
    for h, r in zip(s["loss_history"], ref["loss_history"]):
        assert np.allclose(h["train_loss"], r["train_loss"], rtol=1e-6, atol=0)
        assert np.allclose(h["val_loss"], r["val_loss"], rtol=1e-6, atol=0, equal_nan=True)
        assert np.isfinite(h["val_loss"][-1])  # validation after training: the last epoch's entry
        assert len(h["train_loss"]) == 3
    f_p = load_ensemble(out).predict_f(_probe_raw(), standardised=True)
    f_1 = load_ensemble(d / f"inv_ref{comm.size}").predict_f(_probe_raw(), standardised=True)
    assert np.allclose(f_p, f_1, rtol=1e-6)
    assert np.isclose(s["pk_ratio_lowk_val"], ref["pk_ratio_lowk_val"], rtol=1e-6)
    assert s["n_selected"] == ref["n_selected"] and s["n_batches"] == ref["n_batches"]
    # run directory contents and summary keys
    for key in ("n_ranks", "n_particles", "n_selected", "n_batches", "epochs", "final_train_loss",
                "final_val_loss", "mean_f", "pk_ratio_lowk_train", "pk_ratio_lowk_val", "stage_wall_s",
                "peak_rss_mb", "bytes_per_particle", "train_particles_per_s", "bare_mlp_particles_per_s",
                "exchange_bytes", "particles_per_rank", "cells_per_rank", "epoch_wall_s", "environment", "config"):
        assert key in s, key
    assert s["n_ranks"] == comm.size and s["n_particles"] == 32**3
    assert set(s["stage_wall_s"]) >= {"features", "routing", "orthogonalise", "train", "evaluate"}
    # the RSS trace: every stage occurrence in order (training box, then the validation box), whose
    # peaks give the per-stage peaks
    trace = s["stage_rss_trace_mb"]
    assert [t["stage"] for t in trace] == ["load", "features", "orthogonalise", "routing", "train", "evaluate",
                                           "load", "features", "routing", "evaluate", "evaluate"]
    assert all(0 < t["start_mb"] <= t["peak_mb"] for t in trace)
    for stage, peak in s["stage_peak_rss_mb"].items():
        assert peak == max(t["peak_mb"] for t in trace if t["stage"] == stage)
    if comm.rank == 0:
        on_disk = json.loads((out / "summary.json").read_text())
        assert on_disk["n_batches"] == s["n_batches"]
        for name in ("config.yaml", "model.pt", "spectra.h5", "train.log", "checkpoints/member_1.pt"):
            assert (out / name).is_file(), name
        assert not (out / "scratch").exists()  # the positions set aside during training are read back
        if comm.size == 2:
            for name in ("pk_ratio.png", "loss.png", "f_vs_theta0.png"):
                assert (out / "figures" / name).stat().st_size > 1000
        with h5py.File(out / "spectra.h5") as f:
            assert set(f) == {"train", "val"}
            assert f["val/ratio_members"].shape[0] == 2
            assert np.allclose(f["val/uncorr_avg"][:], f["val/P_model_avg"][:] - f["val/P_hm_avg"][:] ** 2 / f["val/P_h"][:],
                               equal_nan=True)
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("extra, stop, where", [
    ({}, {"stop_after_epochs": 3}, (1, 1, None)),
    ({"warmup_steps": 30}, {"stop_after_epochs": 3}, (1, 1, None)),
    ({"warmup_steps": 30}, {"stop_after_steps": 6}, (0, 1, 2)),  # mid-epoch: member 0, epoch 2 after 2 steps
    ({}, {"stop_after_steps": 4}, (0, 1, None)),  # the last step of an epoch: the epoch is finished
    ({"constraint": "projection"}, {"stop_after_epochs": 3}, (1, 1, None)),
    ({"constraint": "projection"}, {"stop_after_steps": 6}, (0, 1, 2)),
    ({"normalise_steps": True}, {"stop_after_steps": 6}, (0, 1, 2)),
    # clipping from the 6th step on against the last 3 norms: the restart needs the checkpointed norms
    ({"clip_grad": 1.0, "clip_window": 3, "constraint": "projection"}, {"stop_after_steps": 6}, (0, 1, 2)),
    # the full-batch phase stopped after its first check (3 units: 2 epochs, 1 check): the L-BFGS
    # state comes from the checkpoint
    ({"constraint": "projection", "grid_loss": "poisson", "polish": {"evaluations": 4, "check_every": 2}},
     {"stop_after_epochs": 3}, (0, 2, None)),
], ids=["epochs", "warmup_epochs", "warmup_mid_epoch", "epoch_end", "projection_epochs", "projection_mid_epoch",
        "normalise_steps_mid_epoch", "clip_mid_epoch", "polish_mid_phase"])
def test_resume_gives_same_model(comm, sims, extra, stop, where):
    """Resume after a "kill" (after whole epochs, or as on SIGTERM after a step inside an epoch, with
    a mid-epoch checkpoint) reproduces the uninterrupted run, also with a learning-rate warm-up
    longer than the run, so that it spans the restart. 4 batches per epoch, 2 epochs, 2 members."""
    a, b, d = sims
    member, epoch, step = where
    tag = f"{comm.size}{''.join(k[0] for k in extra)}{''.join(f'{k[11]}{v}' for k, v in stop.items())}"
    cfg = write_config(d / f"res{tag}.yaml", a, [b],
                       train={"epochs": 2, "ensemble": 2, "dtype": "float64", "seed": 3, "bare_steps": 1, **extra},
                       run={"log_level": "WARNING", "figures": False})
    full = run(comm, cfg, out=d / f"res_full{tag}")
    part_dir = d / f"res_part{tag}"
    assert full["n_batches"] == 4
    assert run(comm, cfg, out=part_dir, **stop) is None
    if comm.rank == 0:
        ck = torch.load(part_dir / "checkpoints" / f"member_{member}.pt", weights_only=False)
        assert ck["epoch"] == epoch and not ck["done"]
        assert (ck.get("in_epoch") or {}).get("step") == step
        if "polish" in extra:
            assert ck["polish"]["record"]["check"] == [0, 1] and not ck["polish"]["finished"]
        assert not (part_dir / "checkpoints" / f"member_{member + 1}.pt").exists()
        assert not (part_dir / "model.pt").exists()
        assert not list((part_dir / "checkpoints").glob(".*tmp"))  # atomic: no temporary left
        assert not (part_dir / "scratch").exists()  # the positions set aside are removed on a stop
    comm.Barrier()
    resumed = run(comm, cfg, out=part_dir, resume=True)
    assert resumed["loss_history"] == full["loss_history"] or all(
        np.allclose(h1["train_loss"], h2["train_loss"], rtol=1e-12)
        for h1, h2 in zip(resumed["loss_history"], full["loss_history"]))
    m_full, m_res = load_ensemble(d / f"res_full{tag}"), load_ensemble(part_dir)
    for p, q in zip(m_full.members, m_res.members):
        for (k, v), (k2, v2) in zip(p.state_dict().items(), q.state_dict().items()):
            assert k == k2 and torch.allclose(v, v2, rtol=1e-12, atol=1e-14), k
    # resuming with another configuration is refused
    with pytest.raises(ValueError, match="different configuration"):
        run(comm, cfg, out=part_dir, resume=True, overrides=["train.lr=0.5"])


@pytest.mark.mpi
def test_mass_conservation(comm, sims):
    """One batch holding all particles (frac 1): the eps schedule (1e-4 from epoch 10) and the lr decay (0.9^epoch) drive the
    global mean f over the training particles to 1 within 1e-3."""
    a, _, d = sims
    cfg = write_config(d / f"mass{comm.size}.yaml", a, [],
                       sampling={"frac": 1.0, "batch_size": 10**6},
                       train={"epochs": 40, "ensemble": 1, "lr": 0.01, "bare_steps": 1},
                       run={"log_level": "WARNING", "figures": False})
    s = run(comm, cfg, out=d / f"mass_run{comm.size}")
    assert s["n_batches"] == 1 and s["n_selected"] == 32**3
    assert abs(s["mean_f"] - 1) < 1e-3
    assert s["loss_history"][0]["eps"][-1] == pytest.approx(1e-4)



@pytest.mark.mpi
def test_mean_f_exact_over_all_particles_with_subsampling(comm, sims):
    """With 30% of each cell selected the per-epoch renormalisation is a sub-sample estimate; the final
    normalisation over every training particle makes the global mean f 1 to float precision. With the
    constraint off, f is left alone."""
    a, b, d = sims
    common = dict(sampling={"frac": 0.3, "batch_size": 4000}, run={"log_level": "WARNING", "figures": False})
    cfg = write_config(d / f"exact{comm.size}.yaml", a, [b], train={"epochs": 3, "ensemble": 1, "bare_steps": 1}, **common)
    s = run(comm, cfg, out=d / f"exact_run{comm.size}")
    factor = s["loss_history"][0]["final_normalisation"]
    assert s["mean_f"] == pytest.approx(1.0, abs=2e-6) and factor != 1.0
    assert s["mean_f_val_expected"] == pytest.approx(1.0, abs=1e-5)  # planted truths: mean 1 in every box
    assert s["mean_f_val_expected_shot_noise"] == 0.0  # an exact truth has no draw of halos
    off = write_config(d / f"off{comm.size}.yaml", a, [], train={"epochs": 2, "ensemble": 1, "bare_steps": 1,
                                                                 "constraint_from": 100}, **common)
    s_off = run(comm, off, out=d / f"off_run{comm.size}")
    assert "final_normalisation" not in s_off["loss_history"][0] and abs(s_off["mean_f"] - 1) > 1e-5
