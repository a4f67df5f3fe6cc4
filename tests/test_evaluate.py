"""Evaluation of member fields: one routing with every member's f, consumed columns, the average of
chosen members, and the same spectra on any number of ranks."""
import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.bias.evaluate import evaluate_simulation, member_verdicts

BOX, NMESH = 100.0, 16


def _particles(comm, n_total=6000, seed=5):
    rng = np.random.default_rng(seed)
    pos = ((rng.random((n_total, 3)) - 0.5) * BOX).astype(np.float32)
    f = np.stack([1 + 0.5 * np.sin(pos[:, 0] / 7), 1 + 0.3 * np.cos(pos[:, 1] / 5), np.full(n_total, 1.0)])
    f = f.astype(np.float32)
    halo = ((rng.random((300, 3)) - 0.5) * BOX).astype(np.float32)
    parts = np.array_split(np.arange(n_total), comm.size)[comm.rank]
    hparts = np.array_split(np.arange(300), comm.size)[comm.rank]
    return pos[parts], f[:, parts], halo[hparts], np.ones(len(hparts))


@pytest.mark.mpi
def test_consumed_columns_and_average_rows(comm):
    pos, f, hpos, hw = _particles(comm)
    ref = evaluate_simulation(comm, f, pos, hpos, hw, BOX, NMESH, kmax=0.5)
    cols = {f"f{m}": f[m].copy() for m in range(len(f))}
    got = evaluate_simulation(comm, cols, pos, hpos, hw, BOX, NMESH, kmax=0.5)
    assert cols == {}
    for key in ("P_model_avg", "ratio_members", "P_h"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12)
    assert got["average_rows"] == [0, 1, 2] and abs(got["mean_f"] - np.mean(got["mean_f_members"])) < 1e-15
    n = comm.allreduce(len(pos))
    direct = comm.allreduce(float(f.astype(np.float64).sum(axis=1)[0])) / n
    assert abs(got["mean_f_members"][0] - direct) < 1e-12
    one = evaluate_simulation(comm, f, pos, hpos, hw, BOX, NMESH, kmax=0.5, average_rows=lambda r: [1])
    np.testing.assert_allclose(one["P_model_avg"], ref["P_model_members"][1], rtol=1e-6)
    assert one["average_rows"] == [1] and one["mean_f"] == one["mean_f_members"][1]


@pytest.mark.mpi
def test_same_spectra_as_one_rank(comm):
    pos, f, hpos, hw = _particles(comm)
    got = evaluate_simulation(comm, f, pos, hpos, hw, BOX, NMESH, kmax=0.5)
    all_pos = np.concatenate(comm.allgather(pos))
    all_f = np.concatenate(comm.allgather(f), axis=1)
    all_h = np.concatenate(comm.allgather(hpos))
    ref = evaluate_simulation(MPI.COMM_SELF, all_f, all_pos, all_h, np.ones(len(all_h)), BOX, NMESH, kmax=0.5)
    for key in ("P_model_avg", "P_model_members", "P_hm_avg", "P_h"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-10)
    assert abs(got["mean_f"] - ref["mean_f"]) < 1e-12


@pytest.mark.mpi
def test_truth_per_particle_and_shot_noise_equal_numpy(comm):
    """The true tracers' weight per particle and sqrt(sum w^2) / sum w, from all ranks' tracers."""
    pos, f, hpos, _ = _particles(comm)
    rng = np.random.default_rng(11)
    w_all = rng.pareto(1.5, 300) + 1.0  # a steep halo-mass-like distribution
    hw = np.array_split(w_all, comm.size)[comm.rank]
    got = evaluate_simulation(comm, f, pos, hpos, hw, BOX, NMESH, kmax=0.5)
    assert abs(got["truth_per_particle"] - w_all.sum() / 6000) < 1e-12 * w_all.sum()
    assert abs(got["truth_shot_noise"] - np.sqrt(np.sum(w_all**2)) / w_all.sum()) < 1e-12


def test_average_of_no_member_refused():
    pos, f, hpos, hw = _particles(MPI.COMM_SELF, n_total=500)
    with pytest.raises(ValueError, match="no member"):
        evaluate_simulation(MPI.COMM_SELF, f, pos, hpos, hw, BOX, NMESH, average_rows=lambda r: [])


def test_member_verdicts_with_some_members_failed():
    """One member stopped in training, the others evaluated: each gets its own verdict, and the
    trained ones are the evaluation's rows (a partial failure used to raise KeyError)."""
    result = {"pk_ratio_lowk_members": [1.01, 0.02], "mean_f_members": [1.0, 1.0]}
    out, trained = member_verdicts(3, {1: "diverged at step 89"}, result)
    assert trained == [0, 2]
    assert [m["ok"] for m in out] == [True, False, False]
    assert out[1]["reason"] == "diverged at step 89" and out[2]["reason"].startswith("flat")
