"""Every config shipped under configs/ loads and validates with the loader of its command (and the
simulation config a training config names does too); a typo in any of them fails here."""
from pathlib import Path

import pytest
import yaml

from lagbias_mpi.config.loader import load_config
from lagbias_mpi.config.lstsq import LstsqRunConfig
from lagbias_mpi.config.predict import PredictConfig, load_predict_config
from lagbias_mpi.config.simulate import SimulateConfig, load_simulate_config
from lagbias_mpi.config.train import TrainRunConfig, load_train_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 10 and (REPO / "configs" / "default.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_shipped_config_loads_and_validates(path):
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw, path
    if "simulation" not in raw:  # a simulate config
        cfg = load_simulate_config(path)
        assert isinstance(cfg, SimulateConfig) and cfg.box > 0 and cfg.ppd > 0
        return
    sim = raw["simulation"]
    if "output" in raw:  # a predict config: no training sections
        cfg = load_predict_config(path)
        assert isinstance(cfg, PredictConfig) and cfg.output.nmesh >= 1
    else:
        cfg = load_config(LstsqRunConfig, path) if "lstsq" in raw else load_train_config(path)
        assert isinstance(cfg, TrainRunConfig)
        assert cfg.train.epochs >= 1 and cfg.train.ensemble >= 1 and len(cfg.features.radii) >= 1
    if "simulate" in sim:  # the simulation config it names exists and validates too (paths from the repo root)
        named = REPO / sim["simulate"]
        assert named.is_file(), f"{path}: simulation.simulate {sim['simulate']} not found"
        load_simulate_config(named, list(sim.get("simulate_set", [])))


def test_a_typo_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs" / "default.yaml").read_text() + "\ntrian: {epochs: 3}\n")
    with pytest.raises(Exception, match="trian"):
        load_train_config(bad)
