"""python -m lagbias_mpi.plan: sizes from configs, the memory and time model, the smallest node count,
and the memory model against real training runs on 1 and 2 ranks (run with
``python -m lagbias_mpi.scaling local --ranks 1 2``, which also checks that the loss histories agree)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lagbias_mpi import plan
from lagbias_mpi.hpc import planner as hpc_planner
from lagbias_mpi.hpc import problem as hpc_problem
from lagbias_mpi.hpc import scaling_series as hpc_scaling_series

REPO = Path(__file__).resolve().parent.parent


def test_sizes_builtin_and_abacus():
    s = hpc_problem.load_sizes(str(REPO / "configs/abacus_base_c000_2gpc.yaml"), ["simulation.abacus.n_ic=1152"])
    assert (s.box, s.ppd, s.n_ic, s.source) == (2000.0, 6912, 1152, "abacus")
    assert s.n_particles == round(0.1 * 6912**3)
    assert (s.n_scales, s.n_kinds, s.n_inputs, s.train_nmesh, s.eval_nmesh, s.n_val) == (3, 3, 7, 400, 1024, 1)
    small = hpc_problem.load_sizes(str(REPO / "configs/abacus_small_c000.yaml"))
    assert (small.box, small.ppd, small.n_ic, small.n_val, small.train_nmesh) == (500.0, 1728, 576, 4, 100)
    b = hpc_problem.sizes_from_dict({"simulation": {"simulate": "configs/simulate_default.yaml",
                                             "simulate_set": ["ppd=64", "n_ic=128"]},
                              "features": {"scales": [2.0, 4.0]}, "sampling": {"frac": 0.1}}, REPO)
    assert (b.box, b.ppd, b.n_ic, b.n_particles, b.n_raw, b.n_inputs, b.train_nmesh) == (200.0, 64, 128, 64**3, 6, 5, 40)
    # about 4 particles per cell: every occupied cell keeps one particle (max(int(0.4), 1))
    assert b.n_selected == pytest.approx(40**3 * (1 - 2.718281828**-4.096), rel=1e-3)
    dense = hpc_problem.sizes_from_dict({"simulation": {"simulate": "configs/simulate_default.yaml",
                                                 "simulate_set": ["ppd=64", "n_ic=128"]},
                                  "grid": {"cell": 20.0}, "sampling": {"frac": 0.1}}, REPO)
    assert dense.train_nmesh == 10 and dense.n_selected == int(0.1 * 64**3)
    with pytest.raises(ValueError, match="not found"):
        hpc_problem.sizes_from_dict({"simulation": {"simulate": "nowhere.yaml"}}, REPO)


def _size(**kw) -> hpc_problem.ProblemSize:
    base = dict(box=500.0, ppd=512, n_ic=512, n_particles=512**3, n_scales=3, n_kinds=3, train_nmesh=100,
                eval_nmesh=256, frac=0.1, batch_size=100_000, epochs=50, ensemble=5, width=64, depth=5,
                n_val=1, n_halos=100_000, source="builtin")
    base.update(kw)
    return hpc_problem.ProblemSize(**base)


def test_memory_model_scales_with_ranks():
    s = _size()
    m1, m2, m8 = (hpc_planner.memory_per_rank(s, p, imbalance=1.0) for p in (1, 2, 8))
    base = hpc_planner.BASELINE_MB * hpc_planner.MB
    for st in hpc_planner.STAGES:
        d1, d2, d8 = (m["bytes"][st] - base - hpc_planner.RUNTIME_MB[st] * hpc_planner.MB for m in (m1, m2, m8))
        assert d8 < d2  # the data part falls with the rank count ...
        if st != "routing":  # (routing holds the global int32 cell histogram of the balanced ownership)
            assert d8 == pytest.approx(d2 / 4, rel=0.15)  # ... about as 1/P (batch activations do too)
        if st == "load":  # (from 2 ranks on, the distributed FFT's transposes add to the feature stage)
            assert d2 == pytest.approx(d1 / 2, rel=0.15)
    assert m1["peak_bytes"] == max(m1["bytes"].values())
    more = hpc_planner.memory_per_rank(_size(n_val=3), 8, imbalance=1.0)
    assert more["peak_bytes"] == m8["peak_bytes"]  # validation sims are prepared one at a time, after training


def test_full_batch_phase_in_time_and_memory():
    """train.polish: each evaluation costs a pass over the selected particles per member; the phase
    keeps every batch's cell sums (4 B per training cell of the rank) while it runs."""
    off, on = _size(), _size(polish_evaluations=20)
    t_off, t_on = hpc_planner.time_per_stage(off, 8), hpc_planner.time_per_stage(on, 8)
    per_eval = hpc_planner.DEFAULT_COSTS["polish_s_per_particle_eval"] * on.n_selected / 8
    assert np.isclose(t_on["seconds"]["train"] - t_off["seconds"]["train"], on.ensemble * 20 * per_eval)
    assert t_off["polish_s"] == 0 and np.isclose(t_on["polish_s"], 20 * per_eval)
    m_off, m_on = (hpc_planner.memory_per_rank(s, 8, imbalance=1.0)["bytes"] for s in (off, on))
    c_tr = -(-on.train_nmesh // 8) * on.train_nmesh**2
    assert np.isclose(m_on["train"] - m_off["train"], 4 * c_tr)
    assert all(m_on[st] == m_off[st] for st in hpc_planner.STAGES if st != "train")


def test_fourier_space_loss_in_time_and_memory():
    """train.kspace_loss: a refresh (a forward pass over the selected particles and two FFTs of the
    training grid) every refresh_steps batches and one per evaluation of the phase; the field sets'
    bytes in the train stage only; the sizes read from the config."""
    off, on = _size(polish_evaluations=10), _size(polish_evaluations=10, kspace_refresh_steps=3)
    assert on.n_batches == max(round(on.n_selected / on.batch_size), 1) > 3
    assert on.kspace_refreshes_per_epoch == -(-on.n_batches // 3) and off.kspace_refreshes_per_epoch == 0
    P, c = 8, hpc_planner.DEFAULT_COSTS
    t_off, t_on = hpc_planner.time_per_stage(off, P), hpc_planner.time_per_stage(on, P)
    n3 = float(on.train_nmesh) ** 3
    refresh = c["kspace_s_per_particle_refresh"] * on.n_selected / P + 2 * c["fft_s_per_cell_log2"] * n3 * np.log2(n3) / P
    assert np.isclose(t_on["epoch_s"] - t_off["epoch_s"], on.kspace_refreshes_per_epoch * refresh)
    assert np.isclose(t_on["seconds"]["train"] - t_off["seconds"]["train"],
                      on.ensemble * (on.epochs * on.kspace_refreshes_per_epoch + 10) * refresh)
    m_off, m_on = (hpc_planner.memory_per_rank(s, P, imbalance=1.0)["bytes"] for s in (off, on))
    c_tr = -(-on.train_nmesh // P) * on.train_nmesh**2
    sel, n_p = on.n_selected / P, on.n_particles / P
    expected = (4 * on.n_inputs + 16) * sel + 8 * n_p + 40 * on.train_nmesh**3 / P + 40 * c_tr
    assert np.isclose(m_on["train"] - m_off["train"], expected)
    assert all(m_on[st] == m_off[st] for st in hpc_planner.STAGES if st != "train")
    cfg = {"simulation": {"simulate": "configs/simulate_default.yaml"},
           "train": {"kspace_loss": {"enabled": True, "refresh_steps": 2}}}
    assert hpc_problem.sizes_from_dict(cfg, REPO).kspace_refresh_steps == 2
    cfg["train"]["kspace_loss"]["enabled"] = False
    assert hpc_problem.sizes_from_dict(cfg, REPO).kspace_refresh_steps == 0
    # in the full-batch phase only: no refresh in the epochs, one per evaluation, the same bytes
    phase = _size(polish_evaluations=10, kspace_refresh_steps=3, kspace_in_epochs=False)
    t_phase = hpc_planner.time_per_stage(phase, P)
    assert phase.kspace_refreshes_per_epoch == 0 and t_phase["epoch_s"] == t_off["epoch_s"]
    assert np.isclose(t_phase["seconds"]["train"] - t_off["seconds"]["train"], on.ensemble * 10 * refresh)
    assert hpc_planner.memory_per_rank(phase, P, imbalance=1.0)["bytes"] == m_on


def test_fit_and_smallest_fit():
    s = _size()
    p = hpc_planner.plan_job(s, 1, 4, 8.0)
    assert not p["fits"] and p["ranks"] == 4
    best = hpc_planner.smallest_fit(s, 4, 64.0)
    assert best is not None and best["fits"]
    if best["nodes"] > 1:
        assert not hpc_planner.plan_job(s, best["nodes"] - 1, 4, 64.0)["fits"]
    # slab limit: never more ranks than IC / evaluation planes; ranks per node shrink to fit
    q = hpc_planner.plan_job(s, 4, 128, 512.0)
    assert q["ranks"] <= 256 and q["ranks_per_node"] == 64
    r = hpc_planner.plan_job(s, 4, 128, 512.0, ranks_per_node=128)
    assert not r["fits"] and "slab" in r["limits"][0]
    t1, t4 = (hpc_planner.time_per_stage(s, p)["seconds"]["train"] - hpc_planner.DEFAULT_COSTS["train_fixed_s"] for p in (1, 4))
    assert t4 == pytest.approx(t1 / 4)


def test_abacus_base_prediction():
    """The 2 Gpc/h base box with the 1152^3 IC grid (the prediction quoted in docs/supercomputer.md)."""
    s = hpc_problem.load_sizes(str(REPO / "configs/abacus_base_c000_2gpc.yaml"), ["simulation.abacus.n_ic=1152"])
    best = hpc_planner.smallest_fit(s, 128, 512.0)
    assert best is not None and best["ranks"] <= 1024
    assert best["memory"]["peak_bytes"] <= best["available_bytes_per_rank"]
    # ~3.3e10 particles at ~60-80 B per particle plus the grid terms (issue #11 design; was ~1 kB:
    # 73 nodes) over 512 GB nodes: 5 nodes when the batches index the inputs and cells (4 B)
    assert 4 <= best["nodes"] <= 30
    best256 = hpc_planner.smallest_fit(s, 128, 256.0)
    assert best256["nodes"] > best["nodes"]


def test_costs_file(tmp_path):
    f = tmp_path / "costs.json"
    f.write_text(json.dumps({"plan": {"train_s_per_particle_epoch": 1e-5, "unrelated": 3}}))
    c = hpc_planner.load_costs(str(f))
    assert c["train_s_per_particle_epoch"] == 1e-5 and "unrelated" not in c
    assert c["fft_s_per_cell_log2"] == hpc_planner.DEFAULT_COSTS["fft_s_per_cell_log2"]
    with pytest.raises(FileNotFoundError):
        hpc_planner.load_costs(str(tmp_path / "none.json"))


def test_cli(tmp_path, capsys):
    out = tmp_path / "plan.json"
    res = plan.main(["--config", str(REPO / "configs/abacus_small_c000.yaml"), "--nodes", "2",
                     "--cores-per-node", "128", "--mem-per-node", "512", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| routing |" in text and "smallest node count that fits" in text
    js = json.loads(out.read_text())
    assert js["plan"]["nodes"] == 2 and js["smallest_fit"]["nodes"] == res["smallest_fit"]["nodes"]


def test_import_baseline():
    """BASELINE_MB is the measured resident memory of an idle training process (within 30%)."""
    code = ("from mpi4py import MPI; import lagbias_mpi.train; "
            "from lagbias_mpi.mpi.comm import peak_rss_mb; print(peak_rss_mb())")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    measured = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                    check=True).stdout.split()[-1])
    assert abs(hpc_planner.BASELINE_MB - measured) <= 0.3 * measured, measured


# ---- against real runs ----------------------------------------------------------------------------

TINY_SIM = ["ppd=32", "n_ic=64", "box=100.0", "n_realisations=2", "pm.n_steps=8", "halos.min_members=10",
            "output.figures=false"]
TINY_TRAIN = ["features.scales=[2.0, 4.0]", "halos.min_npart=20", "grid.cell=10.0", "grid.eval_nmesh=32",
              "sampling.frac=0.2", "sampling.batch_size=4000", "train.epochs=2", "train.ensemble=1",
              "train.bare_steps=1", "run.figures=false"]


def _builtin_base() -> Path:
    """The built-in training config (configs/default.yaml, or the simulate default before it exists)."""
    return REPO / "configs" / "default.yaml"


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    base = _builtin_base()
    if base.is_file():
        cfg = base
    else:
        cfg = tmp / "train.yaml"
        cfg.write_text(yaml.safe_dump({"simulation": {"simulate": str(REPO / "configs/simulate_default.yaml")}}))
    overrides = [f"simulation.simulate_set={json.dumps(TINY_SIM)}", f"simulation.cache_dir={tmp / 'sims'}",
                 "simulation.val_realisations=[1]", "simulation.train_realisation=0", *TINY_TRAIN]
    # a first run generates the simulations and compiles (and caches) the numba kernels in its own
    # process: the measured runs then hold only what training holds (in a fresh clone the PM, FoF
    # and the JIT compiles otherwise add ~100 MB to the 1-rank run's baseline)
    hpc_scaling_series.run_local(str(cfg), [1], tmp / "warm", overrides, timeout_s=300)
    res = hpc_scaling_series.run_local(str(cfg), [1, 2], tmp / "series", overrides, timeout_s=300)
    return cfg, overrides, res


def test_local_series_agrees(local_runs):
    _, _, res = local_runs
    assert [r["ranks"] for r in res["runs"]] == [1, 2]
    agree = res["loss_agreement"]
    assert agree["agree"], agree
    assert agree["max_rel_diff"]["2"] < 1e-4
    assert Path(res["report"]["png"]).is_file() and Path(res["report"]["markdown"]).is_file()


def test_memory_prediction_within_20_percent(local_runs):
    cfg, overrides, res = local_runs
    size = hpc_problem.load_sizes(str(cfg), overrides)
    for run in res["runs"]:
        summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
        pred = hpc_planner.memory_per_rank(size, summary["n_ranks"])["peak_bytes"] / hpc_planner.MB
        print(f"planner {pred:.0f} MB, measured {summary['peak_rss_mb']:.0f} MB at {summary['n_ranks']} rank(s)")
        assert abs(pred - summary["peak_rss_mb"]) <= 0.2 * summary["peak_rss_mb"], (run, pred, summary["peak_rss_mb"])
