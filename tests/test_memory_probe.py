"""scripts/memory_probe.py (the per-call memory diagnostic of docs/supercomputer.md) runs on a small
box with --train, records every wrapped call of the preparation and the training with a peak no lower than its entry, and its --diff gives bytes per
particle between two particle counts. Run as a subprocess: the probe wraps module functions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mpi4py import MPI
from simfixtures import make_simulation, write_config

ROOT = Path(__file__).resolve().parents[1]


def _probe(cfg: Path, out: Path, scratch: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "scripts/memory_probe.py"), "--config", str(cfg),
                    "--out", str(out), "--scratch", str(scratch), "--train"], check=True, env=env, timeout=240,
                   capture_output=True, text=True)
    return json.loads(out.read_text())


@pytest.mark.skipif(MPI.COMM_WORLD.size > 1, reason="serial: the probe runs as its own process")
def test_memory_probe_records_every_call_and_diffs(tmp_path):
    reports = []
    for ppd in (16, 24):
        sim = make_simulation(tmp_path / f"p{ppd}.h5", ppd=ppd, box=64.0, seed=3)
        cfg = write_config(tmp_path / f"p{ppd}.yaml", sim, features={"scales": [8.0], "kinds": ["delta", "lap"]},
                           grid={"cell": 8.0, "eval_nmesh": 16})
        reports.append(_probe(cfg, tmp_path / f"p{ppd}.json", tmp_path / "scratch"))
    for rep, ppd in zip(reports, (16, 24)):
        rank0 = rep["ranks"][0]
        assert rank0["n_local"] == ppd**3
        names = {c["name"] for c in rank0["calls"]}
        assert {"prepare.featurised_particles", "particles.route_lagrangian", "particles.route_eulerian",
                "prepare.fit_orthogonaliser", "members.member_batches", "members.train_member",
                "loop._epochs"} <= names
        assert {"features", "train"} <= set(rep["stage_peak_rss_mb"])
        assert all(c["peak_mb"] >= c["out_mb"] - 0.5 for c in rank0["calls"])  # VmHWM >= VmRSS
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "scripts/memory_probe.py"), "--diff",
                          str(tmp_path / "p16.json"), str(tmp_path / "p24.json")],
                         check=True, env=env, timeout=60, capture_output=True, text=True)
    assert f"rank 0: {16**3} -> {24**3} particles" in res.stdout
    assert "route_eulerian" in res.stdout and "_epochs" in res.stdout and "B/particle" in res.stdout
