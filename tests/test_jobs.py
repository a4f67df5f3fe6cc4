"""jobs/: every script is valid bash, launches with srun, sources the one site file, and names
configs and lagbias_mpi modules that exist; resubmission resumes (checked with a fake srun)."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
SBATCH = sorted(JOBS.glob("*.sbatch"))
EXPECTED = {"builtin_smoke.sbatch", "abacus_small.sbatch", "abacus_base_2gpc_cpu.sbatch",
            "abacus_base_2gpc_gpu.sbatch"}


def test_expected_scripts_present():
    assert EXPECTED <= {p.name for p in SBATCH}
    assert (JOBS / "site_env.sh").is_file() and (JOBS / "lib.sh").is_file() and (JOBS / "README.md").is_file()


@pytest.mark.parametrize("path", SBATCH + [JOBS / "site_env.sh", JOBS / "lib.sh"], ids=lambda p: p.name)
def test_bash_syntax(path):
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("path", SBATCH, ids=lambda p: p.name)
def test_script_references_exist(path):
    text = path.read_text()
    assert text.startswith("#!/bin/bash")
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M), "no #SBATCH --nodes"
    assert re.search(r"^#SBATCH --time=", text, re.M)
    assert "--requeue" in text and re.search(r"^#SBATCH --signal=B:USR1@\d+", text, re.M)
    assert 'source "${LAGBIAS_ROOT' in text and "jobs/site_env.sh" in text
    assert "lagbias_srun" in text, "jobs launch through srun (lagbias_srun)"
    assert "--out \"$RUN_DIR\"" in text and "lagbias_resume_flag" in text
    configs = re.findall(r"--config\s+(configs/[\w.\-/]+\.yaml)", text)
    assert configs, "no --config configs/....yaml"
    for c in configs:
        assert (REPO / c).is_file(), f"{path.name} names missing config {c}"
    modules = re.findall(r"-m\s+(lagbias_mpi\.\w+)", text)
    assert modules
    for m in modules:
        assert importlib.util.find_spec(m) is not None, f"{path.name} names missing module {m}"
    for key in re.findall(r"--set\s+([\w.]+)=", text):
        assert key.startswith(("simulation.", "train.", "grid.", "sampling.", "features.", "halos.", "run."))


def test_gpu_script_one_rank_per_gpu():
    text = (JOBS / "abacus_base_2gpc_gpu.sbatch").read_text()
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", text, re.M).group(1))
    tasks = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)", text, re.M).group(1))
    assert gpus == tasks
    assert "lagbias_srun --gpu" in text


def test_site_env_defines_everything(tmp_path):
    """Sourcing site_env.sh (generic site) sets the variables the scripts use."""
    script = (f'export LAGBIAS_ROOT={REPO} LAGBIAS_VENV={REPO}/.venv SCRATCH={tmp_path}; '
              f'source {JOBS}/site_env.sh; echo "$OMP_NUM_THREADS|$LAGBIAS_RUNS|$LAGBIAS_PYTHON|$LAGBIAS_SRUN_CPU"')
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert res.returncode == 0, res.stderr
    omp, runs, py, srun = res.stdout.strip().split("|")
    assert omp == "1" and runs == f"{tmp_path}/lagbias_runs" and py and "--cpu-bind" in srun
    bad = subprocess.run(["bash", "-c", f"LAGBIAS_SITE=nowhere; source {JOBS}/site_env.sh"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "unknown LAGBIAS_SITE" in bad.stderr


def _fake_bin(tmp_path: Path) -> Path:
    """A fake ``srun`` that logs its arguments and a fake ``scontrol``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("srun", "scontrol"):
        p = bindir / name
        p.write_text(f'#!/bin/bash\necho "{name} $*" >> "$FAKE_LOG"\n')
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bindir


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_resubmission_resumes(tmp_path):
    """First submission: no --resume; once a checkpoint exists, the same script adds --resume."""
    bindir = _fake_bin(tmp_path)
    log = tmp_path / "srun.log"
    runs = tmp_path / "runs"
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "LAGBIAS_ROOT": str(REPO),
           "LAGBIAS_RUNS": str(runs), "LAGBIAS_VENV": str(REPO / ".venv"), "SLURM_JOB_ID": "42"}
    script = JOBS / "abacus_small.sbatch"
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    first = log.read_text().splitlines()
    assert len(first) == 1 and "lagbias_mpi.train" in first[0] and "--resume" not in first[0]
    run_dir = runs / "abacus_small_c000"
    assert f"--out {run_dir}" in first[0]
    assert (run_dir / "logs" / "jobs.txt").is_file()
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "member_0.pt").write_bytes(b"x")
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    second = log.read_text().splitlines()[1]
    assert second.endswith("--resume")


def test_requeue_on_usr1(tmp_path):
    """USR1 (sent by Slurm before the wall-time limit) makes the batch shell requeue the job."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text("#!/bin/bash\nsleep 2\n")
    (bindir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
    for p in bindir.iterdir():
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "log"
    script = (f'source {JOBS}/lib.sh; LAGBIAS_SRUN_CPU=""; lagbias_requeue_on_signal; '
              f'(sleep 0.5; kill -USR1 $$) & lagbias_srun --cpu true; echo "rc=$?"')
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "SLURM_JOB_ID": "77"}
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert "rc=0" in res.stdout, res.stderr
    assert log.read_text().strip() == "scontrol requeue 77"
