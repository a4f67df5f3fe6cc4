"""Per-rank arrays set aside on disk while a stage does not need them, so that they do not count in
the stage's resident memory (issue #11: the training box's final positions, 12 B per particle,
are needed to build the box and to evaluate it, not while the members train).

An array is written once (``.npy``, one file per rank and name) and read back once; the file is
removed when it is read or dropped. Plain numpy files rather than a memory map: pages of a mapped
file would count in the resident set again as soon as they are touched.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class SpillError(RuntimeError):
    """A spilled array could not be written or read back (full disk, removed or damaged file)."""


class Spilled:
    """An array written to ``path`` by :func:`spill`; :meth:`restore` reads it back and removes the file."""

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def restore(self) -> np.ndarray:
        """The array, read back into a new array that owns its memory (``np.load`` gives a view,
        which the exchanges could neither hand over nor cut as they send); the file is removed."""
        fmt = np.lib.format
        try:
            with open(self.path, "rb") as fh:
                version = fmt.read_magic(fh)
                header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = header(fh)
                if tuple(shape) != self.shape or dtype != self.dtype or fortran:
                    raise SpillError(f"spilled array {self.path}: holds {dtype}{tuple(shape)}, "
                                     f"expected {self.dtype}{self.shape}")
                arr = np.empty(self.shape, self.dtype)
                got = fh.readinto(memoryview(arr).cast("B")) if arr.nbytes else 0
        except (OSError, ValueError) as exc:
            raise SpillError(f"spilled array {self.path}: cannot be read back ({exc})") from exc
        if got != arr.nbytes:
            raise SpillError(f"spilled array {self.path}: {got} of {arr.nbytes} bytes (damaged file)")
        self.drop()
        return arr

    def drop(self) -> None:
        """Remove the file (nothing happens when it is already gone)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def spill(arr: np.ndarray, directory, name: str, rank: int) -> Spilled:
    """Write ``arr`` to ``directory/<name>.r<rank>.npy`` (the directory is created); the caller
    then drops its references so that the memory is returned."""
    directory = Path(directory)
    path = directory / f"{name}.r{rank}.npy"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
            fh.flush()
    except OSError as exc:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise SpillError(f"cannot set {name} aside in {directory} ({exc}); set run.scratch_dir to a "
                         f"directory with room for it") from exc
    return Spilled(path, arr.shape, arr.dtype)


def spiller(directory, name: str, rank: int):
    """``arr -> spill(arr, directory, name, rank)``: the ``set_aside`` hook of a stage that sets one
    array aside (the routed positions of the feature stage)."""
    return lambda arr: spill(arr, directory, name, rank)


def remove_empty_dir(comm, directory) -> None:
    """Remove ``directory`` once every rank of ``comm`` is done with it, if it exists and is empty
    (collective: a barrier, then rank 0)."""
    comm.Barrier()
    if comm.rank == 0:
        try:
            Path(directory).rmdir()
        except OSError:  # absent, or holds what someone else put there
            pass
