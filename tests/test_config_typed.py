"""Typed configuration: defaults written once, validation at construction, round trips, bundled configs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from ocbank import config as config_mod
from ocbank.config import BankConfig, Config, ConfigError, DataConfig, ScoringConfig
from ocbank.errors import OcbankError


def test_sections_are_frozen_and_read_as_attributes():
    cfg = config_mod.from_dict({}, require_root=False)
    assert cfg.scoring.sigma == 4.0 and cfg.data.resize == 256 and cfg.bank.radius == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.scoring.sigma = 2.0  # type: ignore[misc]


def test_to_dict_round_trips_through_yaml():
    cfg = config_mod.from_dict(
        {"data": {"classes": ["a", "b"], "crop": None, "resize": 512}, "bank": {"radius": 22}, "device": "cpu"},
        require_root=False,
    )
    again = config_mod.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), require_root=False)
    assert again == cfg and again.data.classes == ("a", "b") and again.bank.radius == 22.0


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"bank": {"radius": 1e200}}, "bank.radius"),
        ({"bank": {"radius": float("inf")}}, "bank.radius"),
        ({"bank": {"radius": float("nan")}}, "bank.radius"),
        ({"bank": {"radius": True}}, "bank.radius"),
        ({"scoring": {"sigma": float("nan")}}, "scoring.sigma"),
        ({"scoring": {"sigma": float("inf")}}, "scoring.sigma"),
        ({"scoring": {"sigma": 1e6}}, "scoring.sigma"),
        ({"data": {"root": 5}}, "data.root"),
        ({"data": {"num_workers": 100_000}}, "data.num_workers"),
        ({"data": {"classes": ["../x"]}}, "plain name"),
        ({"data": {"classes": ["a/b"]}}, "plain name"),
        ({"data": {"classes": [""]}}, "plain name"),
        ({"data": {"classes": []}}, "data.classes"),
        ({"backbone": {"autocast": "fp32"}}, "autocast"),
        ({"bank": {"max_centroids": 0}}, "bank.max_centroids"),
        ({"decision": {"false_alarm_rate": 0}}, "false_alarm_rate"),
        ({"device": "cuda:x"}, "device"),
        ({"scoring": {"mode": "local_mean", "window": 4}}, "odd"),
    ],
)
def test_bad_values_are_named(given, words):
    with pytest.raises(ConfigError, match=words) as info:
        config_mod.from_dict(given, require_root=False)
    assert isinstance(info.value, OcbankError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_each_default_is_written_once():
    """The Detector's keyword defaults are the dataclasses' defaults, not copies."""
    import inspect

    from ocbank import Detector

    params = inspect.signature(Detector.__init__).parameters
    assert params["sigma"].default == ScoringConfig.sigma
    assert params["radius_images"].default == BankConfig.radius_images
    assert params["image_size"].default == DataConfig.crop
    assert Config().scoring.sigma == ScoringConfig().sigma and math.isfinite(Config().decision.false_alarm_rate)


def test_bundled_configs_load_by_name_and_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the checkout: found inside the package
    names = config_mod.bundled_configs()
    assert {"demo", "mvtec", "realiad", "realiad_512"} <= set(names)
    for name in names:
        cfg = config_mod.load(name, require_root=False)
        assert cfg.backbone.name == "wide_resnet50_2"
    assert config_mod.load("realiad_512", require_root=False).image_size == 512
    with pytest.raises(ConfigError, match="bundled config"):
        config_mod.load("no_such_config", require_root=False)


def test_replace_keeps_validation():
    cfg = config_mod.from_dict({}, require_root=False)
    assert cfg.replace(bank={"radius": 3.0}).bank.radius == 3.0
    with pytest.raises(ConfigError):
        cfg.replace(scoring={"sigma": -1})


def test_export_refuses_a_scoring_mode_the_graph_does_not_compute():
    from ocbank.model.export import settings_from_config

    cfg = config_mod.from_dict({"scoring": {"mode": "local_gauss"}}, require_root=False)
    with pytest.raises(ConfigError, match="scoring.mode"):
        settings_from_config(cfg)
    assert settings_from_config(cfg.replace(scoring={"mode": "nn"})).spec.sigma == 4.0
