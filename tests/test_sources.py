"""Simulation specs: inputs are checked on rank 0 only and a failed check ends every rank with the
same exception (type and message), never a hang."""
import pytest
from simfixtures import make_simulation

from lagbias_mpi.config.abacus import AbacusSource
from lagbias_mpi.config.train import SimulationConfig
from lagbias_mpi.io import sources
from lagbias_mpi.io.abacus_files import AbacusError
from lagbias_mpi.io.simfile import SimulationFileError
from lagbias_mpi.io.sources import (
    abacus_spec,
    check,
    check_all,
    file_spec,
    resolve_training,
)
from lagbias_mpi.mpi.root import RootCheckError, on_root


def raised_everywhere(comm, exc_type, fn, *args):
    """Call ``fn(*args)`` on every rank, expecting ``exc_type``; return the message, checked to be
    the same (and of exactly that type) on every rank."""
    with pytest.raises(exc_type) as info:
        fn(*args)
    got = comm.allgather((type(info.value).__name__, str(info.value)))
    assert got == [got[0]] * comm.size and got[0][0] == exc_type.__name__
    return got[0][1]


@pytest.mark.mpi
def test_bad_specs_give_the_same_error_on_every_rank(comm, shared_tmp):
    missing = file_spec(shared_tmp / "nope.h5")
    msg = raised_everywhere(comm, SimulationFileError, check_all, comm, [missing])
    assert msg == f"simulation file not found: {shared_tmp / 'nope.h5'}"
    if comm.rank == 0:
        (shared_tmp / "junk.h5").write_text("not hdf5")
    comm.Barrier()
    msg = raised_everywhere(comm, SimulationFileError, check_all, comm,
                            [file_spec(shared_tmp / "junk.h5")])
    assert msg.startswith(f"cannot read simulation file {shared_tmp / 'junk.h5'}")
    abacus = abacus_spec(AbacusSource(abacus_root=str(shared_tmp / "nowhere"), sim_name="Sim",
                                              redshift=0.0, cleaned=False))
    msg = raised_everywhere(comm, AbacusError, check_all, comm, [abacus])
    assert msg == f"abacus_root not found: {shared_tmp / 'nowhere'}"
    msg = raised_everywhere(comm, SimulationFileError, check_all, comm, [{"kind": "tape"}])
    assert msg == "unknown simulation source kind 'tape'"


@pytest.mark.mpi
def test_check_runs_on_rank0_only_and_meta_is_broadcast(comm, shared_tmp, monkeypatch):
    a = make_simulation(shared_tmp / "a.h5", ppd=8, box=32.0, seed=3)
    b = make_simulation(shared_tmp / "b.h5", ppd=8, box=32.0, seed=4)
    calls = []
    real = check
    monkeypatch.setattr(sources, "check", lambda spec: calls.append(spec["path"]) or real(spec))
    metas = check_all(comm, [file_spec(a), file_spec(b)])
    assert comm.allgather(len(calls)) == [2] + [0] * (comm.size - 1)
    assert [m.box for m in metas] == [32.0, 32.0] and [m.ppd for m in metas] == [8, 8]
    assert comm.allgather(metas) == [metas] * comm.size
    calls.clear()
    train, val = resolve_training(comm, SimulationConfig(train_files=(str(a),), val_files=(str(b),)))
    assert [s["path"] for s in train + val] == [str(a), str(b)]
    assert comm.allgather(len(calls)) == [2] + [0] * (comm.size - 1)
    msg = raised_everywhere(comm, SimulationFileError, resolve_training, comm,
                            SimulationConfig(train_files=(str(a),), val_files=(str(shared_tmp / "gone.h5"),)))
    assert msg == f"simulation file not found: {shared_tmp / 'gone.h5'}"


@pytest.mark.mpi
def test_on_root_sends_any_exception(comm):
    def fail(exc):
        raise exc

    assert on_root(comm, lambda x: x + comm.rank, 5) == 5  # rank 0's result everywhere
    assert raised_everywhere(comm, KeyError, on_root, comm, fail, KeyError("header NP")) == "'header NP'"

    class Local(Exception):  # cannot be pickled: sent as a SimulationFileError naming it
        pass

    assert raised_everywhere(comm, RootCheckError, on_root, comm, fail, Local("bad")) == "Local: bad"
