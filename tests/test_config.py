"""Frozen validated configs: unknown keys, wrong types, bad values and bad overrides are refused
with a message naming the dotted key."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from lagbias_mpi.config.loader import (
    ConfigError,
    apply_overrides,
    config_hash,
    from_dict,
    load_config,
    to_dict,
)


@dataclass(frozen=True)
class Smoothing:
    scales: tuple[float, ...] = (1.41, 2.83)
    feature: Literal["g2", "s2"] = "g2"

    def __post_init__(self):
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"smoothing.scales must be > 0, got {self.scales}")


@dataclass(frozen=True)
class Run:
    name: str = "run"
    nmesh: int = 64
    box: float = 500.0
    verbose: bool = False
    seed: int | None = None
    smoothing: Smoothing = field(default_factory=Smoothing)


def test_defaults_and_values():
    cfg = from_dict(Run, {"nmesh": 32, "box": 100, "smoothing": {"scales": [1, 2.5], "feature": "s2"}})
    assert cfg.nmesh == 32 and cfg.box == 100.0 and isinstance(cfg.box, float)
    assert cfg.smoothing.scales == (1.0, 2.5) and cfg.smoothing.feature == "s2"
    assert from_dict(Run, None) == Run()
    assert from_dict(Run, {"nmesh": 16.0}).nmesh == 16  # an integral float is an integer
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.nmesh = 3


@pytest.mark.parametrize("data,match", [
    ({"nmseh": 3}, r"unknown config key\(s\) \['nmseh'\]"),
    ({"smoothing": {"scale": [1.0]}}, r"smoothing\.scale"),
    ({"nmesh": "64"}, r"nmesh: expected an integer"),
    ({"nmesh": 2.5}, r"nmesh: expected an integer"),
    ({"nmesh": True}, r"nmesh: expected an integer"),
    ({"box": "big"}, r"box: expected a number"),
    ({"verbose": 1}, r"verbose: expected true/false"),
    ({"name": 3}, r"name: expected a string"),
    ({"seed": "x"}, r"seed"),
    ({"smoothing": {"scales": 1.0}}, r"smoothing\.scales: expected a list"),
    ({"smoothing": {"scales": [1.0, "a"]}}, r"smoothing\.scales\[1\]: expected a number"),
    ({"smoothing": {"feature": "g3"}}, r"smoothing\.feature: 'g3' is not one of"),
    ({"smoothing": 3}, r"smoothing: expected a mapping"),
    ({"smoothing": {"scales": [1.0, -2.0]}}, r"smoothing.*must be > 0"),
])
def test_bad_input_named(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Run, data)


def test_overrides():
    base = {"nmesh": 8, "smoothing": {"scales": [1.0]}}
    out = apply_overrides(base, ["nmesh=16", "smoothing.scales=[2, 3]", "smoothing.feature=s2", "seed=null"])
    assert out == {"nmesh": 16, "seed": None, "smoothing": {"scales": [2, 3], "feature": "s2"}}
    assert base == {"nmesh": 8, "smoothing": {"scales": [1.0]}}  # the input is not modified
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(base, ["nmesh"])
    with pytest.raises(ConfigError, match="empty key"):
        apply_overrides(base, ["=3"])
    with pytest.raises(ConfigError, match="nmesh is not a section"):
        apply_overrides(base, ["nmesh.x=3"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['smoothing.bogus'\]"):
        from_dict(Run, apply_overrides(base, ["smoothing.bogus=1"]))


def test_load_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: test\nnmesh: 16\nsmoothing:\n  scales: [1.0, 2.0]\n")
    cfg = load_config(Run, path, ["box=250"])
    assert (cfg.name, cfg.nmesh, cfg.box, cfg.smoothing.scales) == ("test", 16, 250.0, (1.0, 2.0))
    assert load_config(Run, None, ["nmesh=4"]).nmesh == 4
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nmesh: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(Run, bad)
    bad.write_text("nmesh: sixteen\n")
    with pytest.raises(ConfigError, match="nmesh: expected an integer"):
        load_config(Run, bad)


def test_to_dict_and_hash():
    cfg = from_dict(Run, {"smoothing": {"scales": [1.0, 2.0]}})
    d = to_dict(cfg)
    assert d["smoothing"]["scales"] == [1.0, 2.0]
    assert from_dict(Run, d) == cfg  # round trip
    assert config_hash(cfg) == config_hash(from_dict(Run, d))
    assert config_hash(cfg) != config_hash(from_dict(Run, {"nmesh": 65}))
    assert len(config_hash(cfg)) == 16
