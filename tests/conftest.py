"""Shared fixtures. MPI tests are marked ``@pytest.mark.mpi`` and run serially and under mpirun."""
import os

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
