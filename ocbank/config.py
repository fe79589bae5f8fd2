"""Typed run configuration: one frozen dataclass per section, each default written once.

A YAML file (or a nested dict) maps onto :class:`Config`; unknown keys are errors that
name the key and list the known ones, and every value is validated when its section is
constructed. Overrides (the CLI's ``--set section.key=value`` and ``--data-root``) merge on
top before validation. A config serialises back to a plain dict (:meth:`Config.to_dict`)
for bank metadata.

    cfg = load("mvtec", data_root="/data/mvtec_ad", overrides={"bank.radius": 0.5})  # or a YAML path
    cfg.scoring.sigma, cfg.data.resize, cfg.bank.radius
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .engine.bank import SEARCH_INDEXES
from .engine.bank import check_radius as check_radius_value
from .engine.knn import CPU_SEARCHES, SEARCH_PRECISIONS, SEARCHES
from .engine.store import resolve_search
from .errors import ConfigError, InputError, warn_once

FORMATS = ("mvtec", "realiad", "folder")
POOLS = ("none", "avg3")
AUTOCAST = ("none", "fp16", "bf16")
SCORING_MODES = ("nn", "local_mean", "local_gauss")
BACKBONES = ("wide_resnet50_2",)
MAX_NUM_WORKERS = 64
MAX_IMAGE_SIDE = 8192
MAX_BATCH_SIZE = 4096
MAX_SIGMA = 64.0
BUNDLED_PREFIX = "<bundled "  # the source of a config read from the package: "<bundled mvtec.yaml>"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

log = logging.getLogger(__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_in(where: str, value: Any, low: int, high: int | None = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        msg = f"{where} must be an integer {bound}, got {value!r}."
        raise ConfigError(msg)


def _choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        msg = f"{where} must be one of {choices}, got {value!r}."
        raise ConfigError(msg)


def check_class_name(name: Any, where: str = "class name") -> str:
    """A class name is a plain file name: letters, digits, ``_ . -``; no separators, no ``..``.

    The one rule for class names, in the config and on the command line (``--classes``):
    a name becomes a file name under the output folder, so it must not reach outside it.
    """
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or ".." in name:
        msg = (
            f"{where} must be a plain name (letters, digits, '_', '.', '-'; no '/', '\\' or '..'), "
            f"got {name!r}. Use the class folder's name."
        )
        raise ConfigError(msg)
    return name


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are resized and cropped."""

    format: str = "mvtec"  # mvtec | realiad | folder
    root: str | None = None
    classes: str | tuple[str, ...] = "all"  # "all" or class names
    resize: int = 256  # resize to a square ...
    crop: int | None = 224  # ... then center crop (None: no crop, the 512 setting)
    json_dir: str = "realiad_jsons/realiad_jsons"  # realiad: split files, relative to root
    image_dir: str = "realiad_256"  # realiad: resolution folder, relative to root
    batch_size: int = 16
    num_workers: int = 0

    def __post_init__(self) -> None:
        _choice("data.format", self.format, FORMATS)
        if self.root is not None and not isinstance(self.root, (str, Path)):
            msg = f"data.root must be a folder path (a string), got {self.root!r}. Quote it in the YAML."
            raise ConfigError(msg)
        if self.root is not None:
            object.__setattr__(self, "root", str(self.root))
        classes = self.classes
        if isinstance(classes, list):
            classes = tuple(classes)
            object.__setattr__(self, "classes", classes)
        if classes != "all":
            if not isinstance(classes, tuple) or not classes:
                msg = f"data.classes must be 'all' or a non-empty list of class names, got {classes!r}."
                raise ConfigError(msg)
            for name in classes:
                check_class_name(name, "each entry of data.classes")
        _int_in("data.resize", self.resize, 1, MAX_IMAGE_SIDE)
        if self.crop is not None:
            _int_in("data.crop", self.crop, 1, MAX_IMAGE_SIDE)
            if self.crop > self.resize:
                msg = f"data.crop ({self.crop}) must not exceed data.resize ({self.resize}). Lower crop or raise resize."
                raise ConfigError(msg)
        for key in ("json_dir", "image_dir"):
            if not isinstance(getattr(self, key), str):
                msg = f"data.{key} must be a relative folder path, got {getattr(self, key)!r}."
                raise ConfigError(msg)
        _int_in("data.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _int_in("data.num_workers", self.num_workers, 0, MAX_NUM_WORKERS)

    @property
    def image_size(self) -> int:
        """Side S of the square model input (the crop, or the resize when there is none)."""
        return int(self.crop or self.resize)


@dataclass(frozen=True)
class BackboneConfig:
    """The feature extractor: WideResNet-50 layer2 + upsampled layer3 (1536-d)."""

    name: str = "wide_resnet50_2"
    weights: str = "imagenet"  # imagenet | none (random, seeded; tests and demo only) | path/to/state_dict.pth
    pool: str = "none"  # none | avg3 (PatchCore's 3x3 local averaging)
    autocast: str = "none"  # none | fp16 | bf16 (CUDA only)

    def __post_init__(self) -> None:
        _choice("backbone.name", self.name, BACKBONES)
        if not isinstance(self.weights, str) or not self.weights:
            msg = f"backbone.weights must be 'imagenet', 'none' or a .pth path, got {self.weights!r}."
            raise ConfigError(msg)
        _choice("backbone.pool", self.pool, POOLS)
        _choice("backbone.autocast", self.autocast, AUTOCAST)


def check_radius(value: Any, where: str = "bank.radius") -> float | str:
    """'auto', or a radius the engine accepts (:func:`ocbank.engine.bank.check_radius`)."""
    if value == "auto":
        return "auto"
    try:
        return check_radius_value(value, where)
    except InputError as exc:  # the engine's rule, reported as a config error
        msg = f"{exc} Or set {where}: auto."
        raise ConfigError(msg) from exc


def autocast_for(autocast: str, device: str) -> str:
    """The one autocast rule: fp16/bf16 apply on CUDA only; elsewhere the backbone runs in fp32.

    ``device`` is a resolved device ("cpu", "cuda", "cuda:N"). A bundled config that asks for
    autocast (Real-IAD's, for the GPU) still runs on a CPU machine: the extractor calls this,
    says once that autocast is off there, and computes exact fp32 features.
    """
    if autocast == "none" or str(device).startswith("cuda"):
        return autocast
    warn_once(
        log,
        f"backbone.autocast {autocast!r} applies on CUDA only; on device {device!r} the backbone runs in fp32. "
        "Set backbone.autocast: none (or --set backbone.autocast=none) to silence this.",
    )
    return "none"


@dataclass(frozen=True)
class BankConfig:
    """The cluster bank: absorption radius and the radius rule's sample."""

    radius: float | str = "auto"  # "auto" (p99 of nearest-other-patch distances) or a number
    radius_images: int = 50  # images sampled for radius: auto
    seed: int = 0
    max_centroids: int | None = None  # a hard cap on the bank's size (None: unbounded): r grows to keep it
    search_index: str = "auto"  # auto (IVF on CPU from 50k centroids) | flat (always exact) | ivf
    # CUDA search: auto (faiss.knn_gpu if the faiss GPU build is present, else torch) | faiss | torch
    gpu_search: str = "auto"
    gpu_search_precision: str = "fp32"  # fp32 | fp16 | bf16 candidates of the torch search (re-checked in fp32)
    # CPU exact search's GEMM: auto (the fastest here, measured once per machine) | faiss | torch | numpy
    cpu_search: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", check_radius(self.radius))
        _int_in("bank.radius_images", self.radius_images, 1)
        _int_in("bank.seed", self.seed, 0)
        if self.max_centroids is not None:
            _int_in("bank.max_centroids", self.max_centroids, 2)
        _choice("bank.search_index", self.search_index, SEARCH_INDEXES)
        _choice("bank.gpu_search", self.gpu_search, SEARCHES)
        _choice("bank.cpu_search", self.cpu_search, CPU_SEARCHES)
        _choice("bank.gpu_search_precision", self.gpu_search_precision, SEARCH_PRECISIONS)
        try:  # the engine's rule for the pair (faiss searches fp32 only), reported as a config error
            resolve_search(self.gpu_search, "cpu", self.gpu_search_precision)
        except InputError as exc:
            msg = f"bank.{exc}"
            raise ConfigError(msg) from exc

    @property
    def search_options(self) -> dict[str, str]:
        """How the bank searches, as :class:`~ocbank.engine.ClusterBank` keywords: search_index,
        gpu_search, gpu_search_precision and cpu_search (every bank a config makes or loads takes them)."""
        return {
            "search_index": self.search_index,
            "gpu_search": self.gpu_search,
            "gpu_search_precision": self.gpu_search_precision,
            "cpu_search": self.cpu_search,
        }


@dataclass(frozen=True)
class ScoringConfig:
    """Patch distances -> image score (max) and map (upsampled, Gaussian-smoothed)."""

    sigma: float = 4.0  # Gaussian blur of the maps in pixels (PatchCore's 4); 0 = none
    # Image score from the patch-distance grid: nn (its maximum, the method), local_mean (max of
    # window x window means) or local_gauss (max after a blur of grid_sigma patches).
    mode: str = "nn"
    window: int = 3
    grid_sigma: float = 1.0

    def __post_init__(self) -> None:
        _choice("scoring.mode", self.mode, SCORING_MODES)
        _int_in("scoring.window", self.window, 1, 15)
        if self.window % 2 == 0:
            msg = f"scoring.window must be odd (a window centred on each patch), got {self.window}. Use 3 or 5."
            raise ConfigError(msg)
        g = self.grid_sigma
        if not _is_number(g) or not math.isfinite(float(g)) or not 0 < float(g) <= 8:
            msg = f"scoring.grid_sigma must be a number in (0, 8] (patches), got {g!r}."
            raise ConfigError(msg)
        object.__setattr__(self, "grid_sigma", float(g))
        s = self.sigma
        if not _is_number(s) or not math.isfinite(float(s)) or not 0 <= float(s) <= MAX_SIGMA:
            msg = f"scoring.sigma must be a number in [0, {MAX_SIGMA:g}] (pixels), got {s!r}. PatchCore uses 4."
            raise ConfigError(msg)
        object.__setattr__(self, "sigma", float(s))


@dataclass(frozen=True)
class DecisionConfig:
    """How OK/NG thresholds are calibrated from normal images only."""

    false_alarm_rate: float = 0.01  # target share of normal images flagged NG
    holdout: float = 0.1  # share of training images held out for calibration when no folder is given

    def __post_init__(self) -> None:
        for key, low, high in (("false_alarm_rate", 0.0, 0.5), ("holdout", 0.0, 0.5)):
            v = getattr(self, key)
            if not _is_number(v) or not low < float(v) <= high:
                msg = f"decision.{key} must be a number in ({low}, {high}], got {v!r}."
                raise ConfigError(msg)
            object.__setattr__(self, key, float(v))


def check_device(value: Any, where: str = "device") -> str:
    if not isinstance(value, str) or not (value in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", value)):
        msg = f"{where} must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {value!r}."
        raise ConfigError(msg)
    return value


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "backbone": BackboneConfig,
    "bank": BankConfig,
    "scoring": ScoringConfig,
    "decision": DecisionConfig,
}


@dataclass(frozen=True)
class Config:
    """A validated run configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    device: str = "auto"
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self) -> None:
        check_device(self.device)

    @property
    def image_size(self) -> int:
        return self.data.image_size

    def to_dict(self) -> dict[str, Any]:
        """The plain nested dict (YAML/JSON-ready) that :func:`from_dict` reads back."""
        out: dict[str, Any] = {}
        for name in _SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            if isinstance(section.get("classes"), tuple):
                section["classes"] = list(section["classes"])
            out[name] = section
        out["device"] = self.device
        return out

    def replace(self, **changes: Any) -> Config:
        """A copy with sections or fields replaced: ``cfg.replace(device="cpu", data={"root": "x"})``."""
        return from_dict(apply_overrides(self.to_dict(), changes), source=self.source, require_root=False)


# The flat keyword parameters of Detector (and of the anomalib adapter, which keeps its own
# explicit signature for anomalib's CLI), each one field of Config: "section.field" or "device".
PARAMETERS: dict[str, str] = {
    "weights": "backbone.weights",
    "radius": "bank.radius",
    "pool": "backbone.pool",
    "sigma": "scoring.sigma",
    "scoring_mode": "scoring.mode",
    "image_size": "data.crop",
    "resize": "data.resize",
    "device": "device",
    "autocast": "backbone.autocast",
    "radius_images": "bank.radius_images",
    "seed": "bank.seed",
    "max_centroids": "bank.max_centroids",
    "false_alarm_rate": "decision.false_alarm_rate",
    "batch_size": "data.batch_size",
    "num_workers": "data.num_workers",
}
# Resize-to-crop ratio of the MVTec convention (256 -> 224), used when only image_size is given.
RESIZE_RATIO = DataConfig.resize / DataConfig.crop


def config_from_parameters(**params: Any) -> Config:
    """The :class:`Config` that Detector-style keyword parameters (:data:`PARAMETERS`) stand for;
    the rest keep their defaults. ``resize`` None (or absent) is ``image_size`` * 256 / 224."""
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        msg = f"unknown parameter(s) {unknown}. Known: {sorted(PARAMETERS)}."
        raise ConfigError(msg)
    crop = params.get("image_size", DataConfig.crop)
    if params.get("resize") is None:
        params["resize"] = round(crop * RESIZE_RATIO) if _is_int(crop) else crop  # a bad crop is named below
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    device = Config.device
    for name, value in params.items():
        if PARAMETERS[name] == "device":
            device = value
        else:
            section, key = PARAMETERS[name].split(".")
            sections[section][key] = value
    return Config(**{name: cls(**sections[name]) for name, cls in _SECTIONS.items()}, device=device, source="<parameters>")


def parameters_of(config: Config, names: Iterable[str] = PARAMETERS) -> dict[str, Any]:
    """The keyword parameters ``names`` (of :data:`PARAMETERS`) that give ``config``'s values back."""
    out = {}
    for name in names:
        path = PARAMETERS[name]
        if path == "device":
            out[name] = config.device
        else:
            section, key = path.split(".")
            out[name] = getattr(getattr(config, section), key)
    return out


def _section(name: str, cls: type, given: Any) -> Any:
    if not isinstance(given, dict):
        msg = f"config key {name!r} must be a mapping, got {given!r}."
        raise ConfigError(msg)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in given:
        if key not in known:
            raise _unknown_key(f"{name}.{key}")
    return cls(**given)


def from_dict(given: Any, source: str = "<dict>", require_root: bool = True) -> Config:
    """Build and validate a :class:`Config` from a nested dict (missing keys take their defaults)."""
    if not isinstance(given, dict):
        msg = f"{source}: a config must be a YAML mapping, got {type(given).__name__}."
        raise ConfigError(msg)
    for key in given:
        if key not in (*_SECTIONS, "device"):
            raise _unknown_key(str(key))
    sections = {name: _section(name, cls, given.get(name, {})) for name, cls in _SECTIONS.items()}
    cfg = Config(**sections, device=check_device(given.get("device", "auto")), source=source)
    if require_root:
        check_root(cfg)
    return cfg


def is_bundled(cfg: Config) -> bool:
    """Whether ``cfg`` was read from a config shipped inside the package (one a user cannot edit)."""
    return cfg.source.startswith(BUNDLED_PREFIX)


def check_root(cfg: Config) -> None:
    """data.root must be set and be an existing folder."""
    root = cfg.data.root
    fix = "Pass --data-root DIR (Python: config.load(..., data_root=DIR))"
    if not is_bundled(cfg):
        fix += f", or set data.root in {cfg.source}"
    if not root:
        msg = f"{cfg.source}: data.root is not set. {fix}."
        raise ConfigError(msg)
    if not Path(root).is_dir():
        msg = f"data.root {root!r} does not exist or is not a folder. {fix}."
        raise ConfigError(msg)


def known_keys() -> list[str]:
    """Every key a config can set, dotted as ``--set`` takes them: ``data.root``, ..., ``device``."""
    return [*(f"{name}.{f.name}" for name, cls in _SECTIONS.items() for f in dataclasses.fields(cls)), "device"]


def _unknown_key(key: str) -> ConfigError:
    """The one message for a key that is not in the config (a file's, a dict's or ``--set``'s)."""
    return ConfigError(f"unknown config key {key!r}. Known keys: {', '.join(known_keys())}.")


def parse_assignment(text: str) -> tuple[str, Any]:
    """``section.key=value`` (the CLI's ``--set``) -> (dotted key, value as YAML types it).

    The value is read as a YAML scalar or flow list, exactly as the key would be read from a
    config file (``0.5`` a number, ``null`` none, ``[a, b]`` a list, ``'0.5'`` a string).
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        msg = f"--set takes section.key=value, got {text!r}. Known keys: {', '.join(known_keys())}."
        raise ConfigError(msg)
    if key not in known_keys():
        raise _unknown_key(key)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        msg = f"--set {key}: the value {raw!r} is not a YAML value ({' '.join(str(exc).split())}). Quote it."
        raise ConfigError(msg) from exc
    return key, value


def apply_overrides(given: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the config dict ``given`` with ``overrides`` on top.

    An override is a dotted key (``{"bank.radius": 0.5}``, as ``--set`` gives them), a section
    merged key by key (``{"bank": {"radius": 0.5}}``) or ``device``. A dotted key that is not a
    config key is refused, naming every known key; the values are validated with the rest.
    """
    out = copy.deepcopy(given)
    for key, value in overrides.items():
        if "." in key:
            if key not in known_keys():
                raise _unknown_key(key)
            section, name = key.split(".")
            current = out.get(section)
            out[section] = {**(current if isinstance(current, dict) else {}), name: value}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def bundled_configs() -> list[str]:
    """Names of the configs shipped with the package (``mvtec``, ``realiad``, ...)."""
    folder = resources.files("ocbank") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: str | Path) -> tuple[Any, str]:
    """The YAML text of a config file, or of a bundled config given by name."""
    p = Path(path)
    if p.is_file():
        return p.read_text(encoding="utf-8"), str(p)
    name = str(path)
    if "/" not in name and "\\" not in name and not p.suffix:
        bundled = resources.files("ocbank") / "configs" / f"{name}.yaml"
        if bundled.is_file():
            return bundled.read_text(encoding="utf-8"), f"{BUNDLED_PREFIX}{name}.yaml>"
    msg = (
        f"config file {path} does not exist. Pass --config with a YAML file, or a bundled config by name "
        f"({', '.join(bundled_configs())})."
    )
    raise ConfigError(msg)


def load(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    require_root: bool = True,
    data_root: str | Path | None = None,
) -> Config:
    """Read a YAML config file (or a bundled one by name) and validate it.

    ``overrides`` merge on top (:func:`apply_overrides`: ``{"bank.radius": 0.5}`` or
    ``{"bank": {"radius": 0.5}}``), then ``data_root`` sets ``data.root``: how a bundled
    config is pointed at the data, ``config.load("mvtec", data_root="/data/mvtec_ad")``.
    """
    text, source = _read_yaml(path)
    try:
        given = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        msg = f"{source} is not valid YAML: {exc}".replace("\n", " ")
        raise ConfigError(msg) from exc
    if overrides or data_root is not None:
        if not isinstance(given, dict):
            msg = f"{source}: a config must be a YAML mapping, got {type(given).__name__}."
            raise ConfigError(msg)
        given = apply_overrides(given, {**(overrides or {}), **({} if data_root is None else {"data.root": str(data_root)})})
    return from_dict(given, source=source, require_root=require_root)
