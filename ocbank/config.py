"""YAML run configuration: defaults, strict key checking and validation."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


DEFAULTS: dict[str, Any] = {
    "data": {
        "format": "mvtec",  # mvtec | realiad | folder
        "root": None,
        "classes": "all",  # "all" or a list of class names
        "resize": 256,
        "crop": 224,  # null: no crop (the 512 setting)
        "json_dir": "realiad_jsons/realiad_jsons",  # realiad: split files, relative to root
        "image_dir": "realiad_256",  # realiad: resolution folder, relative to root
        "batch_size": 16,
        "num_workers": 0,
    },
    "backbone": {
        "name": "wide_resnet50_2",
        "weights": "imagenet",  # imagenet | none | path/to/state_dict.pth
        "pool": "none",  # none | avg3
        "autocast": "none",  # none | fp16 | bf16 (CUDA only)
    },
    "bank": {
        "radius": "auto",  # "auto" (p99 of nearest-other-patch distances) or a number
        "radius_images": 50,  # images sampled for radius: auto
        "seed": 0,
    },
    "scoring": {"sigma": 4.0},
    "device": "auto",
}

FORMATS = ("mvtec", "realiad", "folder")


def _merge(defaults: dict[str, Any], given: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        name = f"{where}.{key}" if where else key
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            msg = f"unknown config key {name!r}. Known keys here: {known}."
            raise ConfigError(msg)
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                msg = f"config key {name!r} must be a mapping, got {value!r}."
                raise ConfigError(msg)
            out[key] = _merge(defaults[key], value, name)
        else:
            out[key] = value
    return out


def _positive_int(cfg: dict[str, Any], section: str, key: str, allow_zero: bool = False) -> None:
    value = cfg[section][key]
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        msg = f"{section}.{key} must be an integer >= {low}, got {value!r}."
        raise ConfigError(msg)


@dataclass
class Config:
    """A validated configuration; ``raw`` is the full nested dict with defaults."""

    raw: dict[str, Any]
    source: str = "<dict>"

    @property
    def data(self) -> dict[str, Any]:
        return self.raw["data"]

    @property
    def backbone(self) -> dict[str, Any]:
        return self.raw["backbone"]

    @property
    def bank(self) -> dict[str, Any]:
        return self.raw["bank"]

    @property
    def device(self) -> str:
        return self.raw["device"]

    @property
    def image_size(self) -> int:
        return int(self.data["crop"] or self.data["resize"])


def from_dict(given: dict[str, Any], source: str = "<dict>", require_root: bool = True) -> Config:
    """Merge ``given`` over the defaults and validate it."""
    if not isinstance(given, dict):
        msg = f"{source}: a config must be a YAML mapping, got {type(given).__name__}."
        raise ConfigError(msg)
    cfg = _merge(DEFAULTS, given, "")
    data, backbone, bank = cfg["data"], cfg["backbone"], cfg["bank"]
    if data["format"] not in FORMATS:
        msg = f"data.format must be one of {FORMATS}, got {data['format']!r}."
        raise ConfigError(msg)
    if require_root:
        if not data["root"]:
            msg = f"{source}: data.root is not set. Point it at the dataset folder."
            raise ConfigError(msg)
        if not Path(data["root"]).is_dir():
            msg = f"data.root {data['root']!r} does not exist or is not a folder. Fix the path in {source}."
            raise ConfigError(msg)
    classes = data["classes"]
    if classes != "all" and not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        msg = f"data.classes must be 'all' or a list of class names, got {classes!r}."
        raise ConfigError(msg)
    for key in ("resize", "batch_size"):
        _positive_int(cfg, "data", key)
    _positive_int(cfg, "data", "num_workers", allow_zero=True)
    if data["crop"] is not None:
        _positive_int(cfg, "data", "crop")
        if data["crop"] > data["resize"]:
            msg = f"data.crop ({data['crop']}) must not exceed data.resize ({data['resize']})."
            raise ConfigError(msg)
    if backbone["name"] != "wide_resnet50_2":
        msg = f"backbone.name must be 'wide_resnet50_2', got {backbone['name']!r}."
        raise ConfigError(msg)
    if not isinstance(backbone["weights"], str) or not backbone["weights"]:
        msg = f"backbone.weights must be 'imagenet', 'none' or a .pth path, got {backbone['weights']!r}."
        raise ConfigError(msg)
    for key, choices in (("pool", ("none", "avg3")), ("autocast", ("none", "fp16", "bf16"))):
        if backbone[key] not in choices:
            msg = f"backbone.{key} must be one of {choices}, got {backbone[key]!r}."
            raise ConfigError(msg)
    radius = bank["radius"]
    if radius != "auto" and (
        isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 < float(radius) < float("inf")
    ):
        msg = f"bank.radius must be 'auto' or a positive number, got {radius!r}."
        raise ConfigError(msg)
    _positive_int(cfg, "bank", "radius_images")
    _positive_int(cfg, "bank", "seed", allow_zero=True)
    sigma = cfg["scoring"]["sigma"]
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma < 0:
        msg = f"scoring.sigma must be a number >= 0, got {sigma!r}."
        raise ConfigError(msg)
    if cfg["device"] not in ("cpu", "cuda", "auto") and not str(cfg["device"]).startswith("cuda:"):
        msg = f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {cfg['device']!r}."
        raise ConfigError(msg)
    return Config(raw=cfg, source=source)


def load(path: str | Path, overrides: dict[str, Any] | None = None, require_root: bool = True) -> Config:
    """Read a YAML config file and validate it (``overrides`` are merged on top)."""
    p = Path(path)
    if not p.is_file():
        msg = f"config file {p} does not exist. Pass --config with a YAML file, e.g. configs/mvtec.yaml."
        raise ConfigError(msg)
    try:
        given = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        msg = f"{p} is not valid YAML: {exc}".replace("\n", " ")
        raise ConfigError(msg) from exc
    if overrides:
        given = copy.deepcopy(given)
        for section, values in overrides.items():
            if isinstance(values, dict):
                given.setdefault(section, {}).update(values)
            else:
                given[section] = values
    return from_dict(given, source=str(p), require_root=require_root)
