"""Export a bank file as one inference graph: ONNX (``torch.onnx.export``, dynamo) or OpenVINO IR.

The graph takes ``image`` float32 [N, 3, S, S] (RGB in [0, 1], already resized and
cropped; N dynamic) and returns ``score`` [N] and ``map`` [N, S, S], plus
``label`` [N] int64, ``normalized`` [N] and ``mask`` [N, S, S] uint8 when the
bank's metadata holds calibrated ``decision`` thresholds. The bank's means are an
initializer; preprocessing and thresholds are JSON strings in metadata_props.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._version import __version__
from ..errors import ConfigError, DependencyError
from .module import AnomalyModel, MatmulNearest
from .scoring import MapSpec

if TYPE_CHECKING:
    from .detector import Detector

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
OPSET = 18
# OpenVINO's CPU plugin defaults to bf16 on CPUs with bf16 support: ||q||^2 - 2 q.mu + ||mu||^2 then
# loses precision in the distances. Compile exported models with this.
OPENVINO_COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclass(frozen=True)
class Preprocess:
    """What a caller does before the graph: resize to ``resize`` square, center crop ``crop``, RGB / 255."""

    resize: int
    crop: int | None
    resample: str = "bilinear"
    color: str = "RGB"
    range: tuple[float, float] = (0.0, 1.0)
    layout: str = "NCHW"


@dataclass(frozen=True)
class ExportSettings:
    """The config values the graph depends on (read in one place: :func:`settings_from_config`)."""

    preprocess: Preprocess
    spec: MapSpec


def settings_from_config(cfg: Any) -> ExportSettings:
    """Config -> ExportSettings. The only function here that reads the config's layout."""
    if cfg.scoring.mode != "nn":
        msg = (
            f"export builds the method's image score (the grid's maximum), but this bank uses scoring.mode "
            f"{cfg.scoring.mode!r}. Export a bank built with scoring.mode: nn."
        )
        raise ConfigError(msg)
    return ExportSettings(
        Preprocess(resize=cfg.data.resize, crop=cfg.data.crop),
        MapSpec.from_config(cfg),
    )


def build_model(bank_path: str | os.PathLike[str]) -> tuple[AnomalyModel, dict[str, str]]:
    """Bank file -> (AnomalyModel on CPU, metadata_props as {key: JSON string})."""
    from .detector import Detector  # noqa: PLC0415  (detector imports this package's siblings)

    return model_of(Detector.load(bank_path, device="cpu"), os.path.basename(os.fspath(bank_path)))


def model_of(det: Detector, source: str) -> tuple[AnomalyModel, dict[str, str]]:
    """A loaded Detector (on the CPU) -> (AnomalyModel sharing its backbone, metadata_props).

    ``source`` names the bank file in the props.
    """
    settings = settings_from_config(det.config)
    model = AnomalyModel(det.extractor, MatmulNearest(det.bank.means), settings.spec, det.decision)
    props = {
        "ocbank_version": __version__,
        "input": {"name": "image", "dtype": "float32", "shape": ["N", 3, settings.spec.size, settings.spec.size]},
        "preprocess": asdict(settings.preprocess),
        "scoring": {**asdict(settings.spec), "score": "max over the grid of 1-NN L2 distances"},
        "outputs": list(model.output_names),
        "bank": {"n_centroids": len(det.bank), "dim": det.bank.dim, "radius": det.bank.radius_, "source": source},
        "backbone": det.extractor.describe(),
        "decision": None if det.decision is None else det.decision.to_dict(),
    }
    return model, {k: json.dumps(v) for k, v in props.items()}


def export_onnx(
    model: AnomalyModel, out: str | os.PathLike[str], props: dict[str, str], external_data: bool | None = None
) -> Path:
    """Write ``model`` as one ONNX graph with a dynamic batch axis; return the file's path.

    Initializers go to ``<out>.data`` beside the file when ``external_data`` is
    True, or (None) automatically when they exceed protobuf's 2 GB.
    """
    try:
        import onnxscript  # noqa: F401, PLC0415  (the dynamo exporter needs it)
    except ImportError as exc:
        msg = f"exporting to ONNX needs onnx and onnxscript: {exc}. Install the extra: pip install 'ocbank[export]'."
        raise DependencyError(msg) from exc
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = model.spec.size
    example = torch.rand(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=["image"],
            output_names=list(model.output_names),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    program.model.metadata_props.update(props)
    program.model.doc_string = "ocbank: RGB crops [N, 3, S, S] in [0, 1] -> anomaly score [N] and map [N, S, S]."
    program.save(out, external_data=external_data)
    return out


def _openvino() -> Any:
    try:
        import openvino  # noqa: PLC0415
    except ImportError as exc:
        msg = f"--format openvino needs OpenVINO, got ImportError {exc}. Install it: pip install 'ocbank[openvino]'."
        raise DependencyError(msg) from exc
    return openvino


def export_openvino(model: AnomalyModel, out: str | os.PathLike[str], props: dict[str, str]) -> Path:
    """Write OpenVINO IR (``out`` = model.xml, weights beside it) converted from the same ONNX graph.

    Compile it with :data:`OPENVINO_COMPILE_CONFIG` (also in its rt_info under
    ocbank/openvino_compile_config): OpenVINO's CPU plugin otherwise runs in bf16
    where the CPU has it, which moves the distances by a third of the map's range.
    """
    ov = _openvino()
    out = Path(out)
    if out.suffix != ".xml":
        msg = f"OpenVINO IR is written as model.xml + model.bin, got --out {str(out)!r}. Give a path ending in .xml."
        raise ConfigError(msg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        onnx_file = export_onnx(model, Path(tmp) / "model.onnx", props)
        ov_model = ov.convert_model(str(onnx_file))
    props = {**props, "openvino_compile_config": json.dumps(OPENVINO_COMPILE_CONFIG)}
    for key, value in props.items():
        ov_model.set_rt_info(value, ["ocbank", key])
    ov.save_model(ov_model, str(out), compress_to_fp16=False)  # fp16 weights would move the distances
    return out


def export(bank_path: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "onnx") -> Path:
    """Bank file -> exported model file (``fmt`` = "onnx" or "openvino"); return its path."""
    if fmt not in FORMATS:
        msg = f"export format must be one of {FORMATS}, got {fmt!r}. Use --format onnx or --format openvino."
        raise ConfigError(msg)
    if fmt == "openvino":
        _openvino()  # fail before the slow part when OpenVINO is missing
    model, props = build_model(bank_path)
    with torch.inference_mode(False), torch.no_grad():
        if fmt == "onnx":
            return export_onnx(model, out, props)
        return export_openvino(model, out, props)
