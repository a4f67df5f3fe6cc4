"""The ``info`` and ``bench`` commands: they run (also under mpirun) and report what they promise."""
import json
import shutil
import subprocess
import sys

import pytest

from lagbias_mpi import bench, info
from lagbias_mpi.hpc import benchmarks as hpc_benchmarks
from lagbias_mpi.mpi import environment as mpi_environment

INFO_KEYS = {"python", "numpy", "scipy", "numba", "torch", "torch_cuda_available", "torch_cuda_devices", "mpi4py",
             "mpi_library", "mpi_standard", "fft_backend", "fft_backend_version", "fftw", "h5py", "abacusutils",
             "n_ranks"}


@pytest.mark.mpi
def test_info_in_process(comm, capsys):
    got = info.main(["--json"])
    assert INFO_KEYS <= set(got)
    assert got["n_ranks"] == comm.size and got["fft_backend"] == "mpi4py-fft"
    assert got["numpy"] and got["mpi4py"] and got["fft_backend_version"]
    assert "\x00" not in got["mpi_library"]
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert json.loads(out)["n_ranks"] == comm.size
    else:
        assert out == ""
    assert "mpi_standard" in mpi_environment.format_info(got)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not found")
def test_info_command_under_mpirun(tmp_path, mpirun_env):
    proc = subprocess.run(["mpirun", "--oversubscribe", "-n", "2", sys.executable, "-m", "lagbias_mpi.info"],
                          env=mpirun_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = {k.strip(): v.strip() for k, v in (line.split(" : ", 1) for line in proc.stdout.splitlines())}
    assert set(lines) >= INFO_KEYS
    assert lines["n_ranks"] == "2"
    assert lines["fft_backend"] == "mpi4py-fft"  # printed once, by rank 0
    assert proc.stdout.count("fft_backend ") == 1


@pytest.mark.parametrize("text,value", [("16", 16), ("2**24", 2**24), ("2^10", 1024), ("4e6", 4_000_000)])
def test_count_parser(text, value):
    assert hpc_benchmarks.count(text) == value


@pytest.mark.parametrize("text", ["0", "abc", "2**x"])
def test_count_parser_refuses(text):
    with pytest.raises(Exception, match="count"):
        hpc_benchmarks.count(text)


@pytest.mark.mpi
def test_bench_small(comm, shared_tmp):
    costs = shared_tmp / "costs.json"
    summary = bench.main(["--out", str(shared_tmp / "bench"), "--n", "16", "--particles", "5000", "--repeat", "2",
                          "--exchange-particles", "3000", "--save-costs", str(costs), "--log-level", "WARNING"])
    comm.Barrier()
    on_disk = json.loads((shared_tmp / "bench" / "summary.json").read_text())
    for key in ("fft_s", "fft_scipy_s", "fft_ratio_vs_scipy", "paint_cic_particles_per_s", "paint_ratio_vs_numpy",
                "exchange_MB_per_s", "n_ranks", "versions", "stage_s"):
        assert key in on_disk, key
    assert on_disk["n_ranks"] == comm.size == summary["n_ranks"]
    # random destinations: on P ranks a fraction (P - 1) / P of the particles leaves its rank
    assert on_disk["exchange_off_rank_fraction"] == pytest.approx((comm.size - 1) / comm.size, abs=0.05)
    assert on_disk["exchange_bytes"] == 3000 * 32  # pos float32 x3 + lagr int32 x3 + weight float64
    assert on_disk["versions"]["fft_backend"]["name"] == "mpi4py-fft"
    assert set(on_disk["feature_fft_bytes_per_ic_cell"]) == {"float64", "float32"}
    assert on_disk["feature_memory_n"] == 16
    assert all(on_disk[k] > 0 for k in ("fft_s", "paint_cic_particles_per_s", "exchange_MB_per_s"))
    # the planner's costs are the measured times per unit: route = exchange wall x ranks / particles
    from lagbias_mpi.hpc.planner import load_costs
    route = load_costs(str(costs))["route_s_per_particle"]
    assert route == pytest.approx(on_disk["exchange_s"] * comm.size / 3000, rel=1e-9) and route > 0
    plan_costs = json.loads(costs.read_text())
    assert plan_costs["paint_cic_s_per_particle"] == pytest.approx(
        1.0 / on_disk["paint_cic_cpu_particles_per_s_per_rank"], rel=1e-9)
    assert plan_costs["measured"]["n_ranks"] == comm.size


def test_plane_field_independent_of_ranks():
    full = hpc_benchmarks.plane_field(6, 0, 6, seed=3)
    assert full.dtype.name == "float32"
    assert (hpc_benchmarks.plane_field(6, 2, 5, seed=3) == full[2:5]).all()
