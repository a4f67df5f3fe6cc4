"""Opening HDF5 files the way every reader and writer here does: without HDF5's file locking.

Parallel file systems (Lustre, GPFS) often do not support the POSIX locks HDF5 >= 1.10 takes, and
several ranks read the same file at once; ``locking=False`` per file replaces the process-wide
``HDF5_USE_FILE_LOCKING=FALSE`` that used to be set when the package was imported.
"""
from __future__ import annotations

import os

import h5py


def open_h5(path: str | os.PathLike, mode: str = "r") -> h5py.File:
    """``h5py.File(path, mode)`` without file locking."""
    return h5py.File(path, mode, locking=False)
