"""The pfft-python FFT backend: round trip, equality with mpi4py-fft on the same field (gathered, so
that the Fourier layouts of the two are checked as well) at 1/2/3 ranks, selection through
$LAGBIAS_FFT_BACKEND, and one training run on each backend with the same losses."""
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from lagbias_mpi.mpi.comm import gather_slabs
from lagbias_mpi.mpi.fft import SlabFFT, backend_name, smooth
from lagbias_mpi.mpi.fft_backends import BACKEND_ENV, backend_installed

pytestmark = pytest.mark.skipif(not backend_installed("pfft"),
                                reason="pfft-python not installed: run `make pfft` (PFFT_TARBALL=... if the "
                                       "tarball is not in ../shared/vendor/pfft/)")

BOX = 50.0
WORLD = MPI.COMM_WORLD
TOL = {np.float32: 1e-6, np.float64: 1e-12}


def gather_complex(fft, arr):
    """Full half-complex array from the local Fourier slabs (as this backend cuts them)."""
    full = np.empty((fft.n, fft.n, fft.n // 2 + 1), arr.dtype)
    for sl, a in fft.comm.allgather((fft.complex_slab, arr)):
        full[sl] = a
    return full


def field(n, dtype, seed):
    return np.random.default_rng(seed).standard_normal((n, n, n)).astype(dtype)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [4, 8, 9, 10])  # at 3 ranks: 10 and 4 move planes (PFFT blocks of ceil(N/P))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip(comm, n, dtype):
    fft = SlabFFT(comm, n, BOX, dtype, backend="pfft")
    assert fft.backend["name"] == "pfft" and fft.backend["version"]
    full = field(n, dtype, seed=1)
    local = np.ascontiguousarray(full[fft.real_start:fft.real_stop])
    fk = fft.forward(local)
    assert fk.shape == fft.complex_shape and fk.flags.c_contiguous
    assert fk.dtype == (np.complex64 if dtype == np.float32 else np.complex128)
    fk_before = fk.copy()
    back = fft.backward(fk)
    np.testing.assert_array_equal(fk, fk_before)  # backward leaves its input alone
    assert back.dtype == dtype and back.shape == fft.real_shape
    assert np.abs(back - local).max() <= TOL[dtype] * np.abs(full).max()
    # and unnormalised forward = numpy's rfftn
    ref = np.fft.rfftn(full.astype(np.float64))
    assert np.abs(gather_complex(fft, fk) - ref).max() <= 2 * TOL[dtype] * np.abs(ref).max()


@pytest.mark.mpi
@pytest.mark.parametrize("n", [4, 8, 9, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equals_mpi4py_fft(comm, n, dtype):
    pf = SlabFFT(comm, n, BOX, dtype, backend="pfft")
    mf = SlabFFT(comm, n, BOX, dtype, backend="mpi4py-fft")
    assert (pf.real_start, pf.real_stop, pf.real_shape) == (mf.real_start, mf.real_stop, mf.real_shape)
    full = field(n, dtype, seed=2)
    local = np.ascontiguousarray(full[pf.real_start:pf.real_stop])
    pk, mk = gather_complex(pf, pf.forward(local)), gather_complex(mf, mf.forward(local))
    assert np.abs(pk - mk).max() <= TOL[dtype] * np.abs(mk).max()
    # backward of the same spectrum, and a kernel (smoothing) through local_k: same real slabs
    spec = np.fft.rfftn(field(n, np.float64, seed=3)).astype(pk.dtype)
    pb, mb = pf.backward(spec[pf.complex_slab]), mf.backward(spec[mf.complex_slab])
    assert np.abs(pb - mb).max() <= TOL[dtype] * np.abs(mb).max()
    ps, ms = smooth(pf, spec[pf.complex_slab], 7.0), smooth(mf, spec[mf.complex_slab], 7.0)
    assert np.abs(gather_slabs(comm, ps) - gather_slabs(comm, ms)).max() <= TOL[dtype] * np.abs(ms).max()
    # k-vectors and Hermitian weights of each local Fourier slab agree with the global ones
    for fft in (pf, mf):
        kx, ky, kz = fft.local_k(np.float64)
        k_full = np.fft.fftfreq(n, 1.0 / n) * fft.kf
        np.testing.assert_allclose(ky.ravel(), k_full[fft.complex_slab[1]])
        assert fft.hermitian_weights().shape[2] == kz.shape[2]


def test_selected_by_environment(monkeypatch):
    from lagbias_mpi.mpi.environment import collect, environment_info

    monkeypatch.setenv(BACKEND_ENV, "pfft")
    assert backend_name() == "pfft"
    fft = SlabFFT(MPI.COMM_SELF, 8, BOX)
    assert fft.backend["name"] == "pfft"
    env = environment_info(MPI.COMM_SELF)
    assert env["fft_backend"] == "pfft" and env["fft_backend_version"] == fft.backend["version"]
    info = collect(MPI.COMM_SELF)
    assert info["fft_backend"] == "pfft" and "pfft" in info["fft_backends_installed"]
    monkeypatch.setenv(BACKEND_ENV, "no-such-fft")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        SlabFFT(MPI.COMM_SELF, 8, BOX)
    monkeypatch.delenv(BACKEND_ENV)
    assert SlabFFT(MPI.COMM_SELF, 8, BOX).backend["name"] == "mpi4py-fft"


@pytest.mark.mpi
def test_training_same_losses_on_both_backends(comm, tmp_path_factory, monkeypatch):
    """One tiny training run per backend (features, routing, k-space evaluation all go through
    SlabFFT): same losses, same summary, the backend recorded in the summary's environment."""
    from simfixtures import make_simulation, write_config

    from lagbias_mpi.workflows.train import run

    d = Path(comm.bcast(str(tmp_path_factory.mktemp("pfft_train")) if comm.rank == 0 else None))
    a, b = make_simulation(d / "a.h5", ppd=16, box=64.0, seed=1), make_simulation(d / "b.h5", ppd=16, box=64.0, seed=2)
    cfg = write_config(d / "cfg.yaml", a, [b], grid={"cell": 4.0, "eval_nmesh": 16},
                       features={"scales": [6.0, 12.0], "kinds": ["delta", "lap", "g2"]},
                       train={"epochs": 2, "ensemble": 1, "dtype": "float64", "seed": 7, "bare_steps": 2},
                       run={"log_level": "WARNING", "figures": False})
    summaries = {}
    for backend in ("mpi4py-fft", "pfft"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        summaries[backend] = run(comm, cfg, out=d / f"run_{backend}")
        assert summaries[backend]["environment"]["fft_backend"] == backend
    m, p = summaries["mpi4py-fft"], summaries["pfft"]
    assert m["n_selected"] == p["n_selected"] and m["n_batches"] == p["n_batches"]
    for hm, hp in zip(m["loss_history"], p["loss_history"], strict=True):
        np.testing.assert_allclose(hp["train_loss"], hm["train_loss"], rtol=1e-6)
        np.testing.assert_allclose(hp["val_loss"], hm["val_loss"], rtol=1e-6)
    assert np.isclose(p["pk_ratio_lowk_val"], m["pk_ratio_lowk_val"], rtol=1e-6, equal_nan=True)
