"""The pfft-python backend of :class:`~lagbias_mpi.mpi.fft.SlabFFT` (PFFT, M. Pippig; the FFT engine
of pmesh, nbodykit and fastpm).

Selected with ``$LAGBIAS_FFT_BACKEND=pfft`` (or ``SlabFFT(..., backend="pfft")``); installed with
``make pfft`` (no internet needed for the PFFT sources) or ``pip install pfft-python`` (internet).

Layout: a 1-D process mesh (slabs), exactly the layouts of the mpi4py-fft backend seen from outside:
real slabs of :mod:`lagbias_mpi.mpi.layout` along axis 0, the half-complex array (N, N, N//2+1) cut
along axis 1 and returned C-contiguous in that natural axis order. Inside, PFFT's r2c with
``PFFT_TRANSPOSED_OUT`` stores the Fourier slab as (local N1, N0, N2//2+1); the copy out of PFFT's
buffer (needed anyway: the buffer is reused) also undoes that transpose. PFFT cuts N planes into
blocks of ceil(N/P) (FFTW-MPI's default block; pfft-python does not expose other blocks), while
our slabs give the first N mod P ranks one plane more. The two agree when P divides N or N mod P =
P - 1 (always at 2 ranks); otherwise the real planes are moved between the two layouts with one
``Alltoallv`` of whole planes before ``forward`` and after ``backward`` (only the planes at slab
edges move). The Fourier cut along axis 1 keeps PFFT's blocks: ``complex_slab`` reports them and
``SlabFFT.local_k``/``hermitian_weights`` follow ``complex_slab``, so callers see consistent k.

Normalisation as the other backend: ``forward`` unnormalised (e^{-ikx}, numpy's sign),
``backward`` includes 1/N^3. Planner effort from ``$LAGBIAS_FFTW_PLANNER`` (FFTW_* -> PFFT_*),
PFFT's transpose tuning off (PFFT_NO_TUNE), so FFTW_ESTIMATE gives bitwise reproducible runs.

Pencils (a 2-D process mesh P = P0 x P1) for grids with fewer planes than ranks (N < P): PFFT
supports them directly (``pfft.ProcMesh([P0, P1])``; real data cut along axes 0 and 1, Fourier
data, with ``PFFT_TRANSPOSED_OUT``, along k_y and k_z). Offering them here would take: (1) a real
layout of pencils — every real-space stage (CIC paint and its ghost plane, which would become a
ghost row and column plus a corner; the particle routing, which would route on (x, y) cells; the
feature extraction at particle cells; the IC/lattice code; gather_slabs) is written for slabs along
axis 0 through :mod:`lagbias_mpi.mpi.layout`, so the layout module and those stages would need a
2-D version; (2) ``complex_slab`` with cuts along axes 1 and 2, which ``local_k`` and
``hermitian_weights`` already support because they slice by ``complex_slab``; (3) tests of every
distributed stage at P > N. Not implemented: with N >= 256 per side in any production use, slabs
are enough up to 256+ ranks per box.
"""
from __future__ import annotations

from importlib import metadata

import numpy as np
from mpi4py import MPI

from lagbias_mpi.mpi.fft_backends import FFTBackend, planner_effort
from lagbias_mpi.mpi.layout import plane_transfer, slab_bounds


def pfft_version() -> str | None:
    """Installed pfft-python version (None when it does not import)."""
    try:
        import pfft
    except ImportError:
        return None
    try:
        return metadata.version("pfft-python")
    except metadata.PackageNotFoundError:  # pragma: no cover - built in place
        return getattr(pfft, "__version__", "unknown")


class PfftBackend(FFTBackend):
    """r2c/c2r of an ``n``^3 grid over ``comm`` with pfft-python, on a 1-D process mesh."""

    name = "pfft"

    def __init__(self, comm, n: int, dtype):
        import pfft

        self.version = pfft_version()
        self.n = int(n)
        self.dtype = np.dtype(dtype)
        single = self.dtype == np.float32
        flags = (pfft.Flags.PFFT_TRANSPOSED_OUT | pfft.Flags.PFFT_DESTROY_INPUT | pfft.Flags.PFFT_NO_TUNE
                 | getattr(pfft.Flags, planner_effort().replace("FFTW_", "PFFT_")))
        self._procmesh = pfft.ProcMesh([comm.size], comm=comm)
        partition = pfft.Partition(pfft.Type.PFFTF_R2C if single else pfft.Type.PFFT_R2C,
                                   [self.n] * 3, self._procmesh, flags)
        self._real_buf = pfft.LocalBuffer(partition)
        self._cplx_buf = pfft.LocalBuffer(partition)
        self._forward = pfft.Plan(partition, pfft.Direction.PFFT_FORWARD, self._real_buf, self._cplx_buf)
        self._backward = pfft.Plan(partition, pfft.Direction.PFFT_BACKWARD, self._cplx_buf, self._real_buf)
        self._real = self._real_buf.view_input()  # (local N0, N, N), PFFT's blocks
        self._cplx = self._cplx_buf.view_output()  # (N, local N1, N//2+1), transposed strides
        self._partition = partition
        self.complex_slab = tuple(slice(int(s), int(s) + int(c))
                                  for s, c in zip(partition.local_o_start, self._cplx.shape))

        # real planes: our slabs (lagbias_mpi.mpi.layout) <-> PFFT's blocks
        self._comm = comm
        start, stop = slab_bounds(self.n, comm.size, comm.rank)
        self.real_slab = (slice(start, stop), slice(0, self.n), slice(0, self.n))
        p_start = int(partition.local_i_start[0]) if self._real.shape[0] else start
        p_stop = p_start + int(self._real.shape[0])
        ours = np.array(comm.allgather((start, stop)), np.int64).reshape(-1, 2)
        theirs = np.array(comm.allgather((p_start, p_stop)), np.int64).reshape(-1, 2)
        held = (ours[:, 1] > ours[:, 0]) | (theirs[:, 1] > theirs[:, 0])
        self.moves_planes = bool(np.any(ours[held] != theirs[held]))
        if self.moves_planes:
            plane = (MPI.FLOAT if single else MPI.DOUBLE).Create_contiguous(self.n * self.n)
            self._plane = plane.Commit()
            to_pfft = plane_transfer(start, stop, theirs[:, 0], theirs[:, 1])
            from_ours = plane_transfer(p_start, p_stop, ours[:, 0], ours[:, 1])
            self._to_pfft = (to_pfft, from_ours)  # (send, recv) of forward
            self._to_ours = (from_ours, to_pfft)  # (send, recv) of backward

    def _move(self, src: np.ndarray, dst: np.ndarray, transfer) -> None:
        (send_counts, send_offsets), (recv_counts, recv_offsets) = transfer
        self._comm.Alltoallv([src, (send_counts.tolist(), send_offsets.tolist()), self._plane],
                             [dst, (recv_counts.tolist(), recv_offsets.tolist()), self._plane])

    def forward(self, real):
        if self.moves_planes:
            self._move(np.ascontiguousarray(real), self._real, self._to_pfft)
        else:
            self._real[...] = real
        self._forward.execute(self._real_buf, self._cplx_buf)
        return np.array(self._cplx, order="C")  # copy out of the reused buffer, natural axis order

    def backward(self, cplx):
        self._cplx[...] = cplx  # c2r destroys its input: the caller's array is never handed over
        self._backward.execute(self._cplx_buf, self._real_buf)
        out = np.empty((self.real_slab[0].stop - self.real_slab[0].start, self.n, self.n), self.dtype)
        if self.moves_planes:
            self._move(self._real, out, self._to_ours)
        else:
            out[...] = self._real
        out *= self.dtype.type(1.0 / self.n**3)
        return out

    def __del__(self):
        plane = getattr(self, "_plane", None)
        if plane is not None and not MPI.Is_finalized():
            plane.Free()
