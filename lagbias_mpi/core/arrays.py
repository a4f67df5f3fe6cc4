"""Arrays handled without a second copy: given back to the allocator while they are consumed (the
exchanges and the orthogonaliser cut their inputs from the end as their outputs fill) and permuted
in place (the Eulerian layout's sort by cell), so that a stage holds about one copy of its rows.
"""
from __future__ import annotations

import numpy as np
from numba import njit


def shrink_rows(holder: dict, key: str, n_rows: int) -> bool:
    """Cut ``holder[key]`` to its first ``n_rows`` rows in place (``ndarray.resize``: the allocator
    returns the tail's pages). Only an array referenced by nothing but ``holder`` can shrink (numpy's
    reference check); otherwise nothing changes and False is returned."""
    arr = holder.pop(key)
    try:
        if arr.flags.owndata and arr.flags.c_contiguous and len(arr) > n_rows:
            arr.resize((n_rows,) + arr.shape[1:], refcheck=True)
            done = True
        else:
            done = len(arr) == n_rows
    except ValueError:  # referenced elsewhere: leave it whole
        done = False
    holder[key] = arr
    return done


def permute_rows_in_place(arr: np.ndarray, dest: np.ndarray) -> None:
    """Move row ``i`` of the C-contiguous ``arr`` to row ``dest[i]`` (a permutation of
    ``range(len(arr))``), in place: cycle by cycle, with one row of scratch and a 1 B flag per row,
    so that a sort of the particle columns does not need a second copy of any column."""
    n = len(arr)
    if len(dest) != n:
        raise ValueError(f"{len(dest)} destinations for {n} rows")
    if not n:
        return
    if not arr.flags.c_contiguous:
        raise ValueError("permute_rows_in_place needs a C-contiguous array")
    rows = arr.reshape(n, -1).view(np.uint8) if arr.ndim > 1 or arr.dtype.itemsize > 1 else arr.reshape(n, 1).view(np.uint8)
    done = np.zeros(n, dtype=np.bool_)
    bad = _permute_bytes(rows, np.asarray(dest), done)
    if bad:
        raise ValueError("permute_rows_in_place: dest is not a permutation")


@njit(cache=True)
def _permute_bytes(rows, dest, done):
    n, w = rows.shape
    carry = np.empty(w, np.uint8)
    swap = np.empty(w, np.uint8)
    for i in range(n):
        if done[i]:
            continue
        carry[:] = rows[i]
        done[i] = True
        j = dest[i]
        while j != i:
            if j < 0 or j >= n or done[j]:
                return 1
            swap[:] = rows[j]
            rows[j] = carry
            carry[:] = swap
            done[j] = True
            j = dest[j]
        rows[i] = carry
    return 0


def held_only_by(holder: dict, key: str) -> bool:
    """Whether ``holder[key]`` is an array that owns its data and is referenced by nothing but
    ``holder`` (numpy's reference check of a resize by one row and back: no data is copied by the
    allocator's remap of a large block). Such an array can be handed over and changed in place."""
    arr = holder.pop(key)
    try:
        if not (isinstance(arr, np.ndarray) and arr.flags.owndata and arr.flags.c_contiguous and arr.ndim):
            return False
        n = len(arr)
        try:
            arr.resize((n + 1,) + arr.shape[1:], refcheck=True)
        except ValueError:
            return False
        arr.resize((n,) + arr.shape[1:], refcheck=True)
        return True
    finally:
        holder[key] = arr
