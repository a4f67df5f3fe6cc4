"""Arrays set aside on disk (core/spill.py) and the training box's positions set aside while the
members train (issue #11: 12 B per particle less in the train stage)."""
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI
from simfixtures import make_simulation, write_config

import lagbias_mpi.workflows.train as train_workflow
from lagbias_mpi.core.spill import SpillError, remove_empty_dir, spill, spiller

WORLD = MPI.COMM_WORLD


def test_spill_round_trip_removes_the_file(tmp_path):
    arr = np.random.default_rng(0).standard_normal((1000, 3)).astype(np.float32)
    sp = spill(arr, tmp_path / "scratch", "pos", 3)
    assert sp.path == tmp_path / "scratch" / "pos.r3.npy" and sp.path.is_file()
    assert sp.nbytes == arr.nbytes
    back = sp.restore()
    assert back.dtype == np.float32 and np.array_equal(back, arr)
    assert back.flags.owndata and back.flags.c_contiguous  # the exchanges can hand it over and cut it
    assert not sp.path.exists()
    sp.drop()  # gone already: nothing happens


def test_spiller_sets_aside_under_its_name(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    sp = spiller(tmp_path / "s", "routed_pos", 3)(a)
    assert sp.path == tmp_path / "s" / "routed_pos.r3.npy" and sp.path.exists()
    assert np.array_equal(sp.restore(), a) and not sp.path.exists()


def test_spill_errors_name_the_file(tmp_path):
    arr = np.arange(100, dtype=np.float64)
    sp = spill(arr, tmp_path, "x", 0)
    sp.path.write_bytes(sp.path.read_bytes()[:-400])  # data truncated: a damaged file
    with pytest.raises(SpillError, match="x.r0.npy: 400 of 800 bytes"):
        sp.restore()
    sp = spill(arr, tmp_path, "h", 0)
    sp.path.write_bytes(sp.path.read_bytes()[:60])  # header truncated
    with pytest.raises(SpillError, match="h.r0.npy: cannot be read back"):
        sp.restore()
    sp = spill(arr, tmp_path, "y", 0)
    np.save(sp.path, arr[:10])  # another array in its place
    with pytest.raises(SpillError, match="expected float64"):
        sp.restore()
    sp = spill(arr, tmp_path, "z", 0)
    sp.drop()
    with pytest.raises(SpillError, match="cannot be read back"):
        sp.restore()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpillError, match="run.scratch_dir"):
        spill(arr, blocker / "sub", "w", 0)


def test_remove_empty_dir_keeps_a_directory_with_files(tmp_path):
    remove_empty_dir(MPI.COMM_SELF, tmp_path / "absent")  # nothing to do
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    remove_empty_dir(MPI.COMM_SELF, tmp_path / "full")
    assert (tmp_path / "full" / "x").is_file()
    (tmp_path / "empty").mkdir()
    remove_empty_dir(MPI.COMM_SELF, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


class _KeptInMemory:
    """Stands in for :func:`spill` in the reference run: the array stays in memory."""

    def __init__(self, arr, directory, name, rank):
        self.arr = arr

    def restore(self):
        return self.arr

    def drop(self):
        pass


@pytest.mark.mpi
def test_positions_wait_on_disk_while_the_members_train(comm, tmp_path_factory, monkeypatch):
    """From the feature stage to the Eulerian routing (both boxes) and while the members train (the
    training box) the planted particles' positions (and its tracers', the same array) are not in
    memory but in run.scratch_dir, one file per rank; they are read back, the files go, and the
    run's figures equal those of a run that kept them in memory."""
    d = Path(WORLD.bcast(str(tmp_path_factory.mktemp("spill")) if WORLD.rank == 0 else None))
    a = make_simulation(d / "a.h5", ppd=16, box=64.0, seed=4)
    b = make_simulation(d / "b.h5", ppd=16, box=64.0, seed=5)
    scratch = d / f"scratch{comm.size}"
    cfg = write_config(d / f"c{comm.size}.yaml", a, [b], features={"scales": [8.0]},
                       grid={"cell": 8.0, "eval_nmesh": 16, "kmax_lowk": 0.3}, train={"epochs": 1, "ensemble": 1, "seed": 3, "bare_steps": 1},
                       run={"log_level": "WARNING", "figures": False, "scratch_dir": str(scratch)})
    real = train_workflow.train_ensemble
    seen = {}

    def checking(comm_, cfg_, trs, *args, **kw):
        t = trs[0]
        seen["pos_in_memory"] = t.parts.pos is not None or t.tracers[0] is not None
        seen["file"] = (scratch / f"train_pos.r{comm_.rank}.npy").is_file()
        return real(comm_, cfg_, trs, *args, **kw)

    import lagbias_mpi.bias.prepare as prepare
    real_feat = prepare.featurised_particles

    def checking_features(*args, **kw):
        parts, used, own = real_feat(*args, **kw)
        seen.setdefault("features", []).append((parts.pos is None, parts.pos_aside.path.name,
                                                parts.pos_aside.path.is_file()))
        return parts, used, own

    monkeypatch.setattr(train_workflow, "train_ensemble", checking)
    monkeypatch.setattr(prepare, "featurised_particles", checking_features)
    s = train_workflow.run(comm, cfg, out=d / f"run{comm.size}")
    r = comm.rank
    assert seen == {"pos_in_memory": False, "file": True,  # training box, then validation box:
                    "features": [(True, f"train_routed_pos.r{r}.npy", True), (True, f"val_routed_pos.r{r}.npy", True)]}
    comm.Barrier()
    assert not scratch.exists()
    # the same numbers as without setting aside: the positions come back bit for bit
    monkeypatch.setattr(train_workflow, "train_ensemble", real)
    monkeypatch.setattr(prepare, "featurised_particles", real_feat)
    monkeypatch.setattr(prepare, "spill", _KeptInMemory)
    ref = train_workflow.run(comm, cfg, out=d / f"ref{comm.size}")
    assert np.isfinite(s["pk_ratio_lowk_train"]) and s["pk_ratio_lowk_train"] == ref["pk_ratio_lowk_train"]
    assert s["pk_ratio_lowk_val"] == ref["pk_ratio_lowk_val"]
    assert s["mean_f"] == ref["mean_f"]
