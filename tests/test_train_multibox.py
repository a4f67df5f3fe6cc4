"""Training on several simulations at once (simulation.train_files with more than one file)."""
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI
from simfixtures import make_simulation, write_config
from waits import self_run

from lagbias_mpi.bias.prepare import sim_labels
from lagbias_mpi.config.train import SimulationConfig
from lagbias_mpi.workflows.train import run

WORLD = MPI.COMM_WORLD


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """Three 32^3-particle planted simulations (two train, one validates), 128 Mpc/h."""
    d = Path(WORLD.bcast(str(tmp_path_factory.mktemp("mbox")) if WORLD.rank == 0 else None))
    return [make_simulation(d / f"s{i}.h5", seed=11 + i) for i in range(3)], d


def _self_run(comm, cfg, out, **kw):
    return self_run(comm, run, cfg, out=out, **kw)


TRAIN = {"epochs": 2, "ensemble": 1, "dtype": "float64", "seed": 7, "bare_steps": 1}
RUN = {"log_level": "WARNING", "figures": False}


@pytest.mark.mpi
@pytest.mark.parametrize("kspace", [False, True], ids=["real", "kspace"])
def test_two_boxes_rank_invariant(comm, sims, kspace):
    """Two training boxes, also with the Fourier-space loss (each batch takes the coefficients of
    its own box): the same losses and spectra on any number of ranks."""
    (a, b, v), d = sims
    tag = f"{comm.size}{'k' if kspace else ''}"
    cfg = write_config(d / f"two{tag}.yaml", a, [v], simulation={"train_files": [str(a), str(b)]},
                       train={**TRAIN, "kspace_loss": {"enabled": kspace, "chunk": 5000}}, run=RUN)
    s = run(comm, cfg, out=d / f"two_run{tag}")
    ref = _self_run(comm, cfg, d / f"two_ref{tag}")
    if kspace:
        assert len(s["loss_history"][0]["kspace_loss"]) == 2
        assert np.allclose(s["loss_history"][0]["kspace_loss"], ref["loss_history"][0]["kspace_loss"], rtol=1e-6)
    assert s["n_train_sims"] == 2 and s["n_particles"] == 2 * 32**3
    assert s["n_selected"] == ref["n_selected"] and s["n_batches"] == ref["n_batches"]
    assert np.allclose(s["loss_history"][0]["train_loss"], ref["loss_history"][0]["train_loss"], rtol=1e-6, atol=0)
    assert np.allclose(s["loss_history"][0]["val_loss"], ref["loss_history"][0]["val_loss"], rtol=1e-6, atol=0,
                       equal_nan=True)
    assert np.isfinite(s["loss_history"][0]["val_loss"][-1])
    assert set(s["pk_ratio_lowk_members"]) == {"train0", "train1", "val"}
    assert np.isclose(s["pk_ratio_lowk_val"], ref["pk_ratio_lowk_val"], rtol=1e-6)


def test_two_boxes_loss_is_the_batch_weighted_mean_of_the_single_boxes(tmp_path, sims):
    """With a vanishing learning rate the model stays at its initialisation, so the epoch loss of
    [a, b] is the batch-count weighted mean of those of [a] and [b] alone (each box's batches carry
    their own cells, scales and targets); it differs only through the orthogonaliser, fitted on both
    boxes together (measured 8e-4 relative). [a, a] has the orthogonaliser of [a] and every batch
    twice: the same loss to rounding, twice the batches."""
    (a, b, v), _ = sims
    tr = dict(TRAIN, epochs=1, lr=1e-12)
    out = {}
    for name, files in (("ab", [a, b]), ("a", [a]), ("b", [b]), ("aa", [a, a])):
        cfg = write_config(tmp_path / f"{name}.yaml", a, [v], simulation={"train_files": [str(f) for f in files]},
                           train=tr, run=RUN)
        out[name] = run(MPI.COMM_SELF, cfg, out=tmp_path / name)
    ab, sa, sb, aa = out["ab"], out["a"], out["b"], out["aa"]
    assert ab["n_selected"] == sa["n_selected"] + sb["n_selected"]
    assert ab["n_batches"] == sa["n_batches"] + sb["n_batches"]
    want = (sa["n_batches"] * sa["final_train_loss"] + sb["n_batches"] * sb["final_train_loss"]) / ab["n_batches"]
    assert sa["final_train_loss"] > 2 * sb["final_train_loss"]  # the two boxes are distinguishable
    assert ab["final_train_loss"] == pytest.approx(want, rel=5e-3)
    assert aa["n_selected"] == 2 * sa["n_selected"] and aa["n_batches"] == 2 * sa["n_batches"]
    assert aa["final_train_loss"] == pytest.approx(sa["final_train_loss"], rel=1e-8)


def test_config_checks():
    with pytest.raises(ValueError, match="also validate"):
        SimulationConfig(simulate="x.yaml", train_realisations=(0, 1), val_realisations=(1,))
    with pytest.raises(ValueError, match="needs simulation.simulate"):
        SimulationConfig(train_files=("a.h5",), train_realisations=(0,))
    assert SimulationConfig(simulate="x.yaml", train_realisations=(2, 3)).training_realisations == (2, 3)
    assert SimulationConfig(simulate="x.yaml").training_realisations == (0,)
    assert sim_labels(1, 1) == ["train", "val"] and sim_labels(2, 2) == ["train0", "train1", "val0", "val1"]


@pytest.mark.mpi
def test_two_boxes_with_kspace_resume(comm, sims):
    """Two training boxes with the Fourier-space loss, "killed" after the first epoch and resumed:
    the same losses and model as the uninterrupted run."""
    (a, b, v), d = sims
    cfg = write_config(d / f"two_res{comm.size}.yaml", a, [v], simulation={"train_files": [str(a), str(b)]},
                       train={**TRAIN, "kspace_loss": {"enabled": True}}, run=RUN)
    full = run(comm, cfg, out=d / f"two_full{comm.size}")
    part = d / f"two_part{comm.size}"
    assert run(comm, cfg, out=part, stop_after_epochs=1) is None
    resumed = run(comm, cfg, out=part, resume=True)
    for key in ("train_loss", "val_loss", "kspace_loss"):
        assert np.allclose(resumed["loss_history"][0][key], full["loss_history"][0][key], rtol=1e-12,
                           equal_nan=True), key
    assert resumed["pk_ratio_lowk_val"] == pytest.approx(full["pk_ratio_lowk_val"], rel=1e-10)
