"""Malformed simulation files are refused before any heavy work, on every rank, with a message
naming the file and the problem: a missing dataset, a wrong shape or dtype, NaN or out-of-box
positions, lattice indices outside [0, ppd), NaN in the initial density; and an empty halo selection."""
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from simfixtures import make_simulation, write_config

from lagbias_mpi.io import sources
from lagbias_mpi.io.simfile import SimulationFileError
from lagbias_mpi.workflows.train import run

WORLD = MPI.COMM_WORLD


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = Path(WORLD.bcast(str(tmp_path_factory.mktemp("badfiles")) if WORLD.rank == 0 else None))
    return make_simulation(d / "good.h5", ppd=8, box=32.0, seed=3, kind="halos"), d


def _replace(f, name, data):
    del f[name]
    f.create_dataset(name, data=data)


def _set(name, index, value):
    def spoil(f):
        data = f[name][()]
        data[index] = value
        f[name][...] = data
    return spoil


DAMAGES = {  # name: (what is done to the file, the message it gives)
    "no_pos": (lambda f: f.__delitem__("particles/pos"), "dataset /particles/pos missing"),
    "no_ic": (lambda f: f.__delitem__("ic/delta"), "dataset /ic/delta missing"),
    "pos_shape": (lambda f: _replace(f, "particles/pos", f["particles/pos"][:-1]),
                  r"/particles/pos has shape \(511, 3\), expected \(512, 3\)"),
    "ic_shape": (lambda f: _replace(f, "ic/delta", f["ic/delta"][:, :, :-1]), "/ic/delta has shape"),
    "lagr_dtype": (lambda f: _replace(f, "particles/lagr_index", f["particles/lagr_index"][()].astype(np.float32)),
                   "/particles/lagr_index has dtype float32, expected integer"),
    "halo_npart_dtype": (lambda f: _replace(f, "halos/npart", f["halos/npart"][()].astype("S8")),
                         "/halos/npart has dtype"),
    "pos_nan": (_set("particles/pos", (500, 1), np.nan), "1 non-finite positions in /particles/pos"),
    "pos_outside": (_set("particles/pos", (3, 0), 16.5),
                    r"1 positions outside the box \[-16, 16\) Mpc/h in /particles/pos \(e.g. \[ *16.5"),
    "lagr_too_big": (_set("particles/lagr_index", (511, 2), 8), r"1 lattice indices outside \[0, ppd = 8\)"),
    "lagr_negative": (_set("particles/lagr_index", (0, 0), -1), r"lattice indices outside \[0, ppd = 8\)"),
    "ic_nan": (_set("ic/delta", (7, 3, 2), np.nan), "1 non-finite values in /ic/delta"),
}


@pytest.mark.mpi
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_malformed_file_refused_on_every_rank(comm, good, damage):
    src, d = good
    spoil, message = DAMAGES[damage]
    path = d / f"{damage}{comm.size}.h5"
    if comm.rank == 0:
        shutil.copy(src, path)
        with h5py.File(path, "r+") as f:
            spoil(f)
    comm.Barrier()
    spec = sources.file_spec(path)
    with pytest.raises(SimulationFileError, match=f"{path}: .*{message}"):
        sources.check_all(comm, [spec])  # the cheap header check of every command (rank 0)
        sources.load(comm, spec)  # the values are checked as they are read (every rank its share)


@pytest.mark.mpi
def test_good_file_passes_and_loads(comm, good):
    src, _ = good
    sources.check_all(comm, [sources.file_spec(src)])
    sim = sources.load(comm, sources.file_spec(src))
    assert comm.allreduce(len(sim.pos)) == 512


@pytest.mark.mpi
def test_damaged_file_stops_train(comm, good):
    src, d = good
    path = d / f"train_nan{comm.size}.h5"
    if comm.rank == 0:
        shutil.copy(src, path)
        with h5py.File(path, "r+") as f:
            _set("particles/pos", (1, 1), np.inf)(f)
    comm.Barrier()
    cfg = write_config(d / f"nan{comm.size}.yaml", path, [], features={"scales": [8.0]}, grid={"cell": 8.0},
                       run={"log_level": "INFO", "figures": False})
    with pytest.raises(SimulationFileError, match=f"{path}: 1 non-finite positions"):
        run(comm, cfg, out=d / f"nan_run{comm.size}")


@pytest.mark.mpi
def test_empty_halo_selection_refused_on_every_rank(comm, good):
    src, d = good
    cfg = write_config(d / f"nohalo{comm.size}.yaml", src, [], features={"scales": [8.0]}, grid={"cell": 8.0},
                       halos={"min_npart": 10**9}, run={"log_level": "WARNING", "figures": False})
    with pytest.raises(ValueError, match=f"{src}: the halo selection is empty"):
        run(comm, cfg, out=d / f"nohalo_run{comm.size}")
