"""``model_field.h5`` and ``particles_f.h5``: outputs of ``python -m lagbias_mpi.predict``
(schema in docs/file_format.md).

The h5py here is serial (no parallel HDF5), so the ranks write in turn: rank 0 creates the file
(under a temporary name, :func:`lagbias_mpi.core.atomic.atomic_path`) with its datasets and
attributes, then each rank opens it, writes its slab of planes (or its block of rows) at its
global offset, closes it and passes a token to the next rank; rank 0 renames the file when the
last rank is done. No rank ever holds more than its own slab or rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lagbias_mpi import __version__
from lagbias_mpi.core.atomic import atomic_path
from lagbias_mpi.io.hdf5 import open_h5
from lagbias_mpi.mpi.layout import slab_bounds

FIELD_FORMAT = "lagbias_mpi.model_field"


PARTICLES_FORMAT = "lagbias_mpi.particles_f"


FORMAT_VERSION = 1


_TOKEN_TAG = 913


def _attr(value):
    """An HDF5-storable attribute value (dicts and lists as JSON text, None as "")."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def _in_turn(comm, path: Path, create, write) -> None:
    """Collective: rank 0 runs ``create(tmp)`` on a temporary file beside ``path``; then every rank in
    rank order runs ``write(tmp)`` (token passed with point-to-point messages); rank 0 renames."""
    def pass_token():
        if comm.rank + 1 < comm.size:
            comm.send(True, dest=comm.rank + 1, tag=_TOKEN_TAG)

    def wait_token():
        if comm.rank > 0:
            comm.recv(source=comm.rank - 1, tag=_TOKEN_TAG)

    if comm.rank == 0:
        with atomic_path(path) as tmp:
            create(tmp)
            comm.bcast(str(tmp), root=0)
            write(tmp)
            pass_token()
            if comm.size > 1:
                comm.recv(source=comm.size - 1, tag=_TOKEN_TAG + 1)
    else:
        tmp = Path(comm.bcast(None, root=0))
        wait_token()
        write(tmp)
        pass_token()
        if comm.rank == comm.size - 1:
            comm.send(True, dest=0, tag=_TOKEN_TAG + 1)
    comm.Barrier()


def write_field(comm, path, slab: np.ndarray, nmesh: int, attrs: dict, dtype=np.float32) -> None:
    """Write this rank's slab (planes ``slab_bounds(nmesh)`` of the first axis) of a global
    ``nmesh``^3 grid into ``path`` as dataset ``/field`` (``dtype``) with root attributes ``attrs``
    (plus format, format_version, code_version, nmesh). Collective; the file appears atomically."""
    path = Path(path)
    start, stop = slab_bounds(nmesh, comm.size, comm.rank)
    if slab.shape != (stop - start, nmesh, nmesh):
        raise ValueError(f"write_field: slab shape {slab.shape}, expected {(stop - start, nmesh, nmesh)}")

    def create(tmp):
        with open_h5(tmp, "w") as f:
            f.attrs["format"], f.attrs["format_version"] = FIELD_FORMAT, FORMAT_VERSION
            f.attrs["code_version"], f.attrs["nmesh"] = __version__, int(nmesh)
            for k, v in attrs.items():
                f.attrs[k] = _attr(v)
            chunk = (1, nmesh, nmesh) if nmesh**2 * np.dtype(dtype).itemsize <= (1 << 22) else None
            f.create_dataset("field", (nmesh,) * 3, dtype=dtype, chunks=chunk)

    def write(tmp):
        if stop > start:
            with open_h5(tmp, "r+") as f:
                f["field"][start:stop] = slab.astype(dtype, copy=False)

    _in_turn(comm, path, create, write)


def write_particles(comm, path, columns: dict[str, np.ndarray], attrs: dict) -> None:
    """Write this rank's rows of each column (first axis = particles; a 2-d column ``(n_members,
    n)`` is stored ``(n_members, N)``, see ``member_columns``) at the rank's global row offset.

    ``columns``: name -> array with this rank's particles along axis 0, except names in
    ``attrs["member_columns"]`` (list) whose particles run along axis 1. Collective; atomic."""
    path = Path(path)
    along1 = set(attrs.get("member_columns", []))
    n_local = {len(v) if k not in along1 else v.shape[1] for k, v in columns.items()}
    if len(n_local) > 1:
        raise ValueError(f"write_particles: columns of different lengths {sorted(n_local)}")
    n = n_local.pop() if n_local else 0
    counts = comm.allgather(int(n))
    off, total = int(sum(counts[: comm.rank])), int(sum(counts))
    shapes = comm.bcast({k: (v.shape, str(v.dtype)) for k, v in columns.items()}, root=0)

    def create(tmp):
        with open_h5(tmp, "w") as f:
            f.attrs["format"], f.attrs["format_version"] = PARTICLES_FORMAT, FORMAT_VERSION
            f.attrs["code_version"], f.attrs["n_particles"] = __version__, total
            for k, v in attrs.items():
                f.attrs[k] = _attr(v)
            for name, (shape, dt) in shapes.items():
                full = (shape[0], total) if name in along1 else (total,) + tuple(shape[1:])
                f.create_dataset(name, full, dtype=dt)

    def write(tmp):
        if n:
            with open_h5(tmp, "r+") as f:
                for name, v in columns.items():
                    if name in along1:
                        f[name][:, off:off + n] = v
                    else:
                        f[name][off:off + n] = v

    _in_turn(comm, path, create, write)


def read_field_attrs(path) -> dict:
    """Root attributes of a ``model_field.h5`` (any rank; cheap)."""
    with open_h5(path, "r") as f:
        if f.attrs.get("format") != FIELD_FORMAT:
            raise ValueError(f"{path} is not a {FIELD_FORMAT} file")
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
