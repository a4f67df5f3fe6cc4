"""Shared fixtures. MPI tests are marked ``@pytest.mark.mpi`` and run serially and under mpirun."""
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")

import pytest  # noqa: E402
from mpi4py import MPI  # noqa: E402


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.fixture
def shared_tmp(tmp_path_factory):
    """A temporary directory with the same path on every rank (rank 0 makes it, broadcasts it)."""
    world = MPI.COMM_WORLD
    path = str(tmp_path_factory.mktemp("shared")) if world.rank == 0 else None
    return __import__("pathlib").Path(world.bcast(path, root=0))


@pytest.fixture
def mpirun_env():
    """Environment for a child ``mpirun`` started by a test: root allowed, one thread, the project on
    PYTHONPATH, and none of this process's (singleton) MPI job variables, so that the child does not
    think it is part of it."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return {k: v for k, v in env.items()
            if not k.startswith(("OMPI_COMM_WORLD", "OMPI_MCA_ess", "PMIX_", "OMPI_MCA_orte"))}
