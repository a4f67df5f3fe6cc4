"""Pages of arrays filled at many places at once (core/memory.small_pages): an exchange's result
fills one front per source rank and must hold what was written, not 2 MiB per front."""
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

import lagbias_mpi.mpi.exchange as exchange_module
from lagbias_mpi.core.memory import numpy_hugepages, small_pages


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    pytest.skip("no /proc/self/status")


def _fill_fronts(out, fronts=256, rows=10):
    seg = len(out) // fronts
    for s in range(fronts):
        out[(s + 1) * seg - rows:(s + 1) * seg] = 1.0


def test_small_pages_restores_the_setting():
    before = numpy_hugepages(True)
    try:
        with small_pages():
            assert numpy_hugepages(False) is False  # off inside
        assert numpy_hugepages(True) is True  # back on after
    finally:
        numpy_hugepages(bool(before))


def test_an_array_written_at_many_fronts_holds_what_was_written():
    """256 fronts of 10 rows in an 80 MB array allocated under small_pages, with numpy's hint on
    outside: the resident growth is of the order of the pages written (< 8 MB), whatever the
    kernel's transparent-huge-page mode (with the hint, 80 MB on a kernel in 'madvise' mode)."""
    before = numpy_hugepages(True)
    try:
        r0 = _rss_mb()
        with small_pages():
            out = np.empty((3_000_000, 7), np.float32)
        _fill_fronts(out)
        grown = _rss_mb() - r0
        assert grown < 8.0, f"{grown:.1f} MB resident for {256 * 10 * 28 / 2**20:.2f} MB written"
        del out
    finally:
        numpy_hugepages(bool(before))


@pytest.mark.mpi
def test_exchange_results_are_allocated_with_small_pages(comm, monkeypatch):
    """The exchange allocates its result columns inside small_pages (on more than one rank)."""
    calls = []
    real = exchange_module.small_pages

    def recording():
        calls.append(True)
        return real()

    monkeypatch.setattr(exchange_module, "small_pages", recording)
    n = 1000
    cols = {"x": np.arange(n, dtype=np.float64) + 1e4 * comm.rank, "d": (np.arange(n) % comm.size).astype(np.int32)}
    got = exchange_module.exchange(comm, cols, "d", consume=True)
    assert len(calls) == (1 if comm.size > 1 else 0)
    total = comm.allreduce(float(got["x"].sum()))
    assert total == sum(float((np.arange(n) + 1e4 * r).sum()) for r in range(comm.size))


def test_heap_info_counts_small_and_large_allocations():
    """``heap_info``: blocks below the mmap threshold are the heap's live bytes; a larger one is
    counted as mapped or, when a free chunk of the heap served it, as live heap bytes."""
    from lagbias_mpi.core.memory import heap_info, tune_malloc

    if heap_info() is None:
        pytest.skip("no glibc mallinfo2")
    tune_malloc()
    before = heap_info()
    small = [bytearray(4096) for _ in range(2000)]  # 8 MB in 4 kB blocks: the heap
    mid = heap_info()
    large = np.ones(16 * 2**20 // 8)  # 16 MB: mapped on its own
    after = heap_info()
    assert mid["in_use"] - before["in_use"] > 7e6 and mid["heap"] >= mid["in_use"]
    # mapped on its own, or served from a free chunk the heap already had (glibc looks there first)
    assert (after["mapped"] - mid["mapped"]) + (after["in_use"] - mid["in_use"]) >= 16 * 2**20
    del small, large
