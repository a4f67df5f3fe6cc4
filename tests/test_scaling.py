"""python -m lagbias_mpi.scaling: the report from synthetic summary.json files, the generated sbatch
series (strong and weak) and the problem growth of weak scaling. The real mpirun series
(``scaling local --ranks 1 2``) runs in tests/test_plan.py, where its runs also check the planner."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from lagbias_mpi import scaling
from lagbias_mpi.hpc import scaling_report as hpc_scaling_report
from lagbias_mpi.hpc import scaling_series as hpc_scaling_series

REPO = Path(__file__).resolve().parent.parent


def _summary(ranks: int, t: dict, n_particles=1_000_000, rss=1000.0, drop=()) -> dict:
    s = {
        "n_ranks": ranks,
        "n_particles": n_particles,
        "n_selected": n_particles // 10,
        "stage_wall_s": dict(t, load=0.5),
        "epoch_wall_s": [[2.0 / ranks, 2.2 / ranks], [2.1 / ranks, 2.0 / ranks]],
        "peak_rss_mb": rss,
        "exchange_bytes": {"train_lagrangian": {"bytes_sum": 48e6, "bytes_max": 48e6 / ranks, "n_particles": n_particles},
                           "train_eulerian": {"bytes_sum": 92e6, "bytes_max": 92e6 / ranks * 1.1, "n_particles": n_particles}},
        "particles_per_rank": {"min": 0.9 * n_particles / ranks, "mean": n_particles / ranks, "max": 1.2 * n_particles / ranks},
        "cells_per_rank": {"min": 100, "mean": 110, "max": 121},
        "loss_history": [{"train_loss": [3.0, 2.0, 1.5]}],
    }
    for k in drop:
        s.pop(k)
    return s


def _write(tmp_path: Path, name: str, s: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps(s))
    return d


def test_report_strong(tmp_path):
    stages = {"features": 8.0, "routing": 4.0, "orthogonalise": 0.4, "train": 40.0, "evaluate": 8.0}
    dirs = [_write(tmp_path, f"r{p}", _summary(p, {k: v / p * (1 + 0.1 * (p > 1)) for k, v in stages.items()},
                                               rss=1000.0 / p + 400))
            for p in (4, 1, 2)]
    rep = hpc_scaling_report.report(dirs, tmp_path / "rep", kind="strong")
    rows = rep["rows"]
    assert [r["n_ranks"] for r in rows] == [1, 2, 4]
    total1 = sum(stages.values()) + 0.5
    assert rows[0]["total_wall_s"] == pytest.approx(total1)
    # efficiency T1 / (P TP) on the total (load does not scale in this synthetic series)
    t4 = sum(v / 4 * 1.1 for v in stages.values()) + 0.5
    assert rows[2]["efficiency"] == pytest.approx(total1 / (4 * t4))
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["epoch_wall_s"] == pytest.approx(1.025)  # median over members and epochs
    assert rows[2]["exchange_bytes_per_rank"]["train_eulerian"] == pytest.approx(92e6 / 4 * 1.1)
    assert rows[2]["particles_imbalance"] == pytest.approx(1.2)
    assert rows[2]["cells_imbalance"] == pytest.approx(1.1)
    assert rows[1]["peak_rss_mb"] == pytest.approx(900.0)
    for f in ("scaling.md", "scaling.json", "scaling.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 100
    assert (tmp_path / "rep" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "rep" / "scaling.md").read_text()
    assert md.count("\n| ") == 4 and "T(P0) P0 / (P T(P))" in md
    js = json.loads((tmp_path / "rep" / "scaling.json").read_text())
    assert js["kind"] == "strong" and len(js["rows"]) == 3


def test_report_weak_guessed_and_missing_keys(tmp_path):
    t = {"features": 5.0, "routing": 2.0, "orthogonalise": 0.2, "train": 20.0, "evaluate": 4.0}
    d1 = _write(tmp_path, "a", _summary(1, t, n_particles=1000))
    d8 = _write(tmp_path, "b", _summary(8, {k: 1.25 * v for k, v in t.items()}, n_particles=8000,
                                        drop=("exchange_bytes", "peak_rss_mb", "cells_per_rank")))
    rep = hpc_scaling_report.report([d1, d8], tmp_path / "rep")
    assert rep["kind"] == "weak"
    r8 = rep["rows"][1]
    assert r8["efficiency"] == pytest.approx((sum(t.values()) + 0.5) / (1.25 * sum(t.values()) + 0.5))
    assert r8["peak_rss_mb"] is None and r8["exchange_bytes_per_rank"] is None
    assert "no peak_rss_mb" in r8["notes"] and "no exchange_bytes" in r8["notes"]
    md = (tmp_path / "rep" / "scaling.md").read_text()
    assert "Missing in summary.json" in md and "—" in md
    assert (tmp_path / "rep" / "scaling.png").is_file()


def test_report_refuses_run_without_ranks(tmp_path):
    s = _summary(2, {"train": 1.0})
    s.pop("n_ranks")
    with pytest.raises(ValueError, match="n_ranks"):
        hpc_scaling_report.report([_write(tmp_path, "x", s)], tmp_path / "rep")
    with pytest.raises(FileNotFoundError):
        hpc_scaling_report.report([tmp_path / "nothing"], tmp_path / "rep")


def test_loss_comparison():
    h = {1: [3.0, 2.0], 2: [3.0, 2.0 * (1 + 1e-6)], 3: [3.0, 2.2], 4: None}
    out = hpc_scaling_series.compare_losses(h)
    assert out["max_rel_diff"]["2"] == pytest.approx(1e-6)
    assert out["max_rel_diff"]["3"] == pytest.approx(0.1)
    assert out["max_rel_diff"]["4"] is None
    assert hpc_scaling_series.loss_history({"loss_history": [{"train_loss": [1.0, None]}]})[0] == 1.0


def _builtin_config(tmp_path: Path) -> Path:
    cfg = {"simulation": {"simulate": "configs/simulate_default.yaml", "simulate_set": ["pm.n_steps=5"],
                          "cache_dir": str(tmp_path / "sims")},
           "grid": {"cell": 5.0, "eval_nmesh": 256}, "train": {"epochs": 2}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_grow_config_builtin():
    data = {"simulation": {"simulate": str(REPO / "configs/simulate_default.yaml"), "simulate_set": ["ppd=64", "n_ic=128"]},
            "grid": {"cell": 5.0, "eval_nmesh": 128}}
    same, changed = hpc_scaling_series.grow_config(data, 1.0)
    assert changed == {} and same == data
    big, changed = hpc_scaling_series.grow_config(data, 8.0)
    assert changed == {"ppd": 128, "n_ic": 256, "box": 400.0, "grid.eval_nmesh": 256}
    assert big["simulation"]["simulate_set"] == ["ppd=128", "n_ic=256", "box=400.0"]
    assert big["grid"]["cell"] == 5.0  # the training grid follows the box: 80^3 cells
    _, c27 = hpc_scaling_series.grow_config(data, 27.0)
    assert c27["ppd"] == 192 and c27["n_ic"] == 384
    with pytest.raises(ValueError, match="ratio"):
        hpc_scaling_series.grow_config(data, 0.5)
    with pytest.raises(ValueError, match="AbacusSummit"):
        hpc_scaling_series.grow_config({"simulation": {"abacus": {"train": "x"}}}, 2.0)
    with pytest.raises(ValueError, match="cannot grow"):
        hpc_scaling_series.grow_config({"simulation": {"train_files": ["a.h5"]}}, 2.0)


def _member_lines(text: str) -> dict:
    return {k: v for k, v in re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M)}


def test_plan_strong_series(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = _builtin_config(tmp_path)
    series = hpc_scaling_series.plan_series(str(cfg), "strong", [4, 1, 2], 8, tmp_path / "out", ["train.epochs=3"],
                                 time_limit="00:20:00")
    out = tmp_path / "out"
    assert [m["nodes"] for m in series["members"]] == [1, 2, 4]
    assert [m["ranks"] for m in series["members"]] == [8, 16, 32]
    for m in series["members"]:
        text = Path(m["script"]).read_text()
        opts = _member_lines(text)
        assert opts["nodes"] == str(m["nodes"]) and opts["ntasks-per-node"] == "8" and opts["time"] == "00:20:00"
        assert "lagbias_srun --cpu" in text and f"--config {m['config']}" in text
        assert f"RUN_DIR={m['run_dir']}" in text and "lagbias_resume_flag" in text
        assert subprocess.run(["bash", "-n", m["script"]]).returncode == 0
        resolved = yaml.safe_load(Path(m["config"]).read_text())
        assert Path(resolved["simulation"]["simulate"]).is_absolute()
        assert Path(resolved["simulation"]["simulate"]).is_file()
        assert resolved["train"]["epochs"] == 3 and m["changed"] == {}
        assert m["size"]["ppd"] == 128 and m["size"]["n_ic"] == 256
    submit = (out / "submit_all.sh").read_text()
    assert "strong_n1.sbatch strong_n2.sbatch strong_n4.sbatch" in submit and "sbatch \"$@\"" in submit
    assert subprocess.run(["bash", "-n", str(out / "submit_all.sh")]).returncode == 0
    assert json.loads((out / "series.json").read_text())["kind"] == "strong"


def test_plan_weak_series_grows_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = _builtin_config(tmp_path)
    series = hpc_scaling_series.plan_series(str(cfg), "weak", [1, 8], 4, tmp_path / "out", gpus_per_node=0)
    m1, m8 = series["members"]
    assert m1["size"]["n_particles"] * 8 == m8["size"]["n_particles"]
    assert m8["size"] == {"box": 400.0, "ppd": 256, "n_ic": 512, "n_particles": 256**3,
                          "train_nmesh": 80, "eval_nmesh": 512}
    r8 = yaml.safe_load(Path(m8["config"]).read_text())
    assert r8["simulation"]["simulate_set"] == ["pm.n_steps=5", "ppd=256", "n_ic=512", "box=400.0"]
    assert series["warnings"] == []


def test_plan_gpu_and_refusals(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    series = hpc_scaling_series.plan_series("configs/abacus_small_c000.yaml", "strong", [1, 2], 128, tmp_path / "g",
                                 gpus_per_node=4)
    text = Path(series["members"][1]["script"]).read_text()
    opts = _member_lines(text)
    assert opts["gpus-per-node"] == "4" and opts["ntasks-per-node"] == "4" and "lagbias_srun --gpu" in text
    big = hpc_scaling_series.plan_series("configs/abacus_small_c000.yaml", "strong", [4], 128, tmp_path / "b")
    assert big["warnings"] and "slab" in big["warnings"][0]
    with pytest.raises(ValueError, match="AbacusSummit"):
        hpc_scaling_series.plan_series("configs/abacus_small_c000.yaml", "weak", [1, 2], 8, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="node counts"):
        hpc_scaling_series.plan_series("configs/abacus_small_c000.yaml", "strong", [0], 8, tmp_path / "z")


def test_cli_error_is_clean(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        scaling.main(["plan", "--config", str(tmp_path / "missing.yaml"), "--nodes", "1", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
