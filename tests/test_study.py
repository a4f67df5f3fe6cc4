"""The Table-1 study command: trains each set once, reuses finished runs, writes table and figures."""
import json
import os

import numpy as np
import pytest
from mpi4py import MPI
from simfixtures import make_simulation, write_config

from lagbias_mpi import study
from lagbias_mpi.workflows import study as workflows_study

# small and fast training settings shared by the study runs
COMMON = dict(grid={"cell": 8.0, "eval_nmesh": 16, "kmax_lowk": 0.3},
              train={"epochs": 1, "ensemble": 2, "lr": 0.01, "seed": 7, "bare_steps": 1})


def halo_sims(d, *seeds):
    """Small mock-halo simulations ``<name>.h5`` (names a, b, c, ... in order) with these seeds."""
    return [make_simulation(d / f"{chr(ord('a') + i)}.h5", ppd=16, box=64.0, seed=seed, kind="halos")
            for i, seed in enumerate(seeds)]


def test_markdown_table_formats_missing_values():
    class C:
        class features:
            scales = "3Rf"
            radii = (1.41, 2.83, 5.66)

    rows = workflows_study.table_rows(["a"], [C], [{"n_inputs": 7, "pk_ratio_lowk_val": 0.98,
                                          "pk_ratio_lowk_members": {"train": [1.0], "val": [0.97, 0.99]}}])
    assert rows[0]["pk_ratio_lowk_val_min"] == 0.97 and rows[0]["pk_ratio_lowk_val_max"] == 0.99
    md = workflows_study.markdown_table(rows, 0.1)
    assert "| 3Rf | 1.41, 2.83, 5.66 | 7 | - | 0.9800 | 0.9700-0.9900 | - | - |" in md


@pytest.mark.mpi
def test_study_two_sets(shared_tmp):
    world = MPI.COMM_WORLD
    d = shared_tmp
    a, b = halo_sims(d, 3, 4)
    c1 = write_config(d / "one.yaml", a, [b], features={"scales": [8.0]}, **COMMON)
    c2 = write_config(d / "two.yaml", a, [b], features={"scales": [8.0, 16.0]}, **COMMON)
    out = d / "study"
    assert study.main(["--configs", str(c1), str(c2), "--out", str(out), "--slice-thickness", "8"]) == 0
    world.Barrier()  # rank 0 writes the outputs
    table = json.loads((out / "table.json").read_text())
    assert [r["run"] for r in table["rows"]] == ["one", "two"]
    assert [r["n_inputs"] for r in table["rows"]] == [3, 5]
    assert all(np.isfinite(r["pk_ratio_lowk_val"]) for r in table["rows"])
    assert "| R=8,16 |" in (out / "table.md").read_text()
    for fig in ("pk_ratio_sets.png", "halo_slices.png"):
        assert (out / "figures" / fig).stat().st_size > 10000
    stamp = os.stat(out / "one" / "model.pt").st_mtime_ns
    world.Barrier()
    assert study.main(["--configs", str(c1), str(c2), "--out", str(out), "--no-slices"]) == 0
    world.Barrier()
    assert os.stat(out / "one" / "model.pt").st_mtime_ns == stamp  # finished runs are reused
    s = json.loads((out / "summary.json").read_text())
    assert s["n_ranks"] == world.size and s["pk_ratio_lowk_val_kspace"] is None
    world.Barrier()
    # a changed configuration is trained again instead of reusing the stale run (run.* does not count)
    assert study.main(["--configs", str(c1), "--out", str(out), "--no-slices", "--set", "run.log_level=ERROR"]) == 0
    world.Barrier()
    assert os.stat(out / "one" / "model.pt").st_mtime_ns == stamp
    assert study.main(["--configs", str(c1), "--out", str(out), "--no-slices", "--set", "train.seed=8"]) == 0
    world.Barrier()
    assert os.stat(out / "one" / "model.pt").st_mtime_ns != stamp
    assert json.loads((out / "one" / "summary.json").read_text())["config"]["train"]["seed"] == 8
    world.Barrier()


def test_variant_report():
    base = {"pk_ratio_lowk_val": 0.95, "pk_ratio_lowk_members": {"train": [1.0, 1.0], "val": [0.9, 1.0]}}
    var = {"pk_ratio_lowk_val": 0.98,
           "pk_ratio_lowk_members": {"train0": [1.0, 1.0], "train1": [1.0, 1.0], "val": [0.97, 0.99]}}
    r = workflows_study.variant_report(var, base)
    assert r["pk_ratio_lowk_val"] == 0.98 and r["baseline_pk_ratio_lowk_val"] == 0.95
    assert r["members_std"] == pytest.approx(0.01) and r["baseline_members_std"] == pytest.approx(0.05)
    assert r["improves_mean"] is True and r["improves_scatter"] is True
    assert r["improves_uncorr"] is None and r["uncorr_ratio_lowk_val"] is None
    assert workflows_study.variant_report(base, var)["improves_mean"] is False
    assert workflows_study.variant_report(var, base, 0.01, 0.02)["improves_uncorr"] is True
    assert workflows_study.variant_report(var, base, 0.03, 0.02)["improves_uncorr"] is False


@pytest.mark.mpi
def test_study_beyond_the_paper(shared_tmp):
    """--kspace and --multibox train the first config again and report both next to the baseline."""
    world = MPI.COMM_WORLD
    d = shared_tmp
    a, b, c = halo_sims(d, 3, 4, 5)
    # the base set with the shipped full-batch phase: the Fourier-space variant keeps it
    train = {**COMMON["train"], "constraint": "projection", "polish": {"evaluations": 2, "check_every": 2}}
    cfg = write_config(d / "base.yaml", a, [b], features={"scales": [8.0]}, grid=COMMON["grid"], train=train)
    out = d / "beyond"
    assert study.main(["--configs", str(cfg), "--out", str(out), "--no-slices", "--kspace",
                       "--multibox", f"simulation.train_files=[{a},{c}]"]) == 0
    world.Barrier()
    s = json.loads((out / "summary.json").read_text())
    base = s["pk_ratio_lowk_val"]["R=8"]
    for key, run in (("pk_ratio_lowk_val_kspace", "base__kspace"), ("pk_ratio_lowk_val_multibox", "base__multibox")):
        r = s[key]
        assert r["run"] == run and r["baseline_pk_ratio_lowk_val"] == base
        assert np.isfinite(r["pk_ratio_lowk_val"]) and r["pk_ratio_lowk_val"] != base
        # the verdicts are those of the figures reported next to them
        assert r["improves_mean"] is (abs(r["pk_ratio_lowk_val"] - 1) < abs(base - 1))
        assert np.isfinite(r["uncorr_ratio_lowk_val"]) and np.isfinite(r["baseline_uncorr_ratio_lowk_val"])
        assert r["improves_uncorr"] is (r["uncorr_ratio_lowk_val"] < r["baseline_uncorr_ratio_lowk_val"])
        if r["members_std"] is None or r["baseline_members_std"] is None:
            assert r["improves_scatter"] is None
        else:
            assert r["improves_scatter"] is (r["members_std"] < r["baseline_members_std"])
    runs = {k: json.loads((out / k / "summary.json").read_text()) for k in ("base__kspace", "base__multibox")}
    for key, run in (("pk_ratio_lowk_val_kspace", "base__kspace"), ("pk_ratio_lowk_val_multibox", "base__multibox")):
        assert s[key]["pk_ratio_lowk_val"] == runs[run]["pk_ratio_lowk_val"]  # the variant run's own figure
    assert len(runs["base__kspace"]["loss_history"][0]["kspace_loss"]) == 1
    assert runs["base__multibox"]["n_train_sims"] == 2
    assert runs["base__kspace"]["polish"] is not None and runs["base__multibox"]["polish"] is not None
    world.Barrier()
