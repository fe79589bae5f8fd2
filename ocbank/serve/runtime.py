"""Scoring runtimes for a loaded bank: the Detector in torch, or its exported graph in onnxruntime.

Both run :class:`~ocbank.model.module.AnomalyModel`; they differ in its 1-NN search (the bank's
own, or matrix products on the means in the graph) and in the engine that executes it.

Both take the same input, uint8 RGB crops [N, S, S, 3] (what :func:`ocbank.serve.api.decode_image`
gives), and return raw scores [N] and maps [N, S, S]; the OK/NG rule is applied after,
in one place (:meth:`ocbank.model.calibration.Decision.apply`), whichever runtime scored.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..config import Config
from ..data.images import rgb8_to_unit
from ..engine import resolve_device
from ..errors import ConfigError, DependencyError
from ..model.calibration import Decision
from ..model.detector import Detector
from ..model.features import FEATURE_STRIDE, FeatureExtractor
from ..model.record import open_bank
from .api import LABELS, grid_map, mask_png

log = logging.getLogger(__name__)


class Runtime(Protocol):
    name: str

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def as_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 RGB [N, S, S, 3] -> float32 [N, 3, S, S] in [0, 1], the layout both runtimes take."""
    return rgb8_to_unit(pixels)


class TorchRuntime:
    """:meth:`Detector.predict` on the decoded crops: the reference every runtime is held to."""

    name = "torch"

    def __init__(self, detector: Detector) -> None:
        self.detector = detector

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pred = self.detector.predict(as_input(pixels))
        return pred.scores, pred.maps


class OnnxRuntime:
    """The graph ``ocbank export`` writes, in onnxruntime's CPU provider (exact 1-NN by matrix products),
    built from a loaded detector (its backbone's weights become the graph's)."""

    name = "onnxruntime"

    def __init__(self, detector: Detector, source: str, threads: int) -> None:
        try:
            import onnxruntime as ort  # noqa: PLC0415 - optional: pip install 'ocbank[export]'
        except ImportError as exc:
            msg = f"--runtime onnxruntime needs onnxruntime: {exc}. Install it: pip install 'ocbank[export]'."
            raise DependencyError(msg) from exc
        from ..model.export import export_onnx, model_of  # noqa: PLC0415 - onnx tools only when asked

        model, props = model_of(detector, source)
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False), torch.no_grad():
            path = export_onnx(model, Path(tmp) / "model.onnx", props)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(["score", "map"], {"image": as_input(pixels).numpy()})
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32)


def onnx_refusal(detector: Detector) -> str | None:
    """Why the exported graph cannot stand in for this detector's scores, or None when it can."""
    cfg = detector.config
    if resolve_device(cfg.device).startswith("cuda"):
        return "the bank runs on CUDA, where torch uses the GPU; onnxruntime here is the CPU provider"
    if cfg.scoring.mode != "nn":
        return f"scoring.mode is {cfg.scoring.mode!r}; the graph computes the method's max 1-NN score only"
    if detector.bank.uses_ivf:
        return "the bank searches with IVF (approximate); the graph's 1-NN is exact and would differ"
    try:
        import onnxruntime  # noqa: F401, PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install 'ocbank[export]')"
    return None


def make_runtime(kind: str, detector: Detector, bank_file: str | os.PathLike[str], threads: int) -> Runtime:
    """``kind`` = torch | onnxruntime | auto. auto: onnxruntime on CPU where the graph is exact, else torch.

    auto's choice is the one benchmarks/bench_serve.py measures side by side on each device
    (onnxruntime's CPU provider beats torch on CPU; on CUDA torch runs on the GPU).
    """
    if kind == "torch":
        return TorchRuntime(detector)
    refusal = onnx_refusal(detector)
    if kind == "onnxruntime":
        if refusal:
            msg = f"--runtime onnxruntime cannot score {bank_file}: {refusal}. Use --runtime torch or auto."
            raise ConfigError(msg)
        return OnnxRuntime(detector, os.path.basename(os.fspath(bank_file)), threads)
    if refusal:
        log.info("runtime auto: torch for %s (%s)", bank_file, refusal)
        return TorchRuntime(detector)
    return OnnxRuntime(detector, os.path.basename(os.fspath(bank_file)), threads)


def _backbone_key(cfg: Config) -> tuple[str, ...] | None:
    """What makes two banks' backbones the same one; None for a weights file (never shared)."""
    bb = cfg.backbone
    if bb.weights not in ("imagenet", "none"):
        return None
    return (bb.weights, bb.pool, bb.autocast, resolve_device(cfg.device))


class ServedBank:
    """One bank in a replica: its detector, its runtime and its thresholds."""

    def __init__(self, detector: Detector, runtime: Runtime, sha256: str) -> None:
        self.detector = detector
        self.runtime = runtime
        self.sha256 = sha256
        self.decision: Decision | None = detector.decision  # the one that labels; its threshold is the one reported

    @classmethod
    def load(
        cls, bank_file: str | os.PathLike[str], sha256: str, kind: str, *, threads: int, batch: int,
        device: str | None = None, extractors: dict[tuple[str, ...], FeatureExtractor] | None = None,
    ) -> ServedBank:
        """Load a bank for serving. ``extractors``: a replica's backbones, shared by every bank that
        uses the same one (built-in weights only: a weights file is checked against the bank each time).
        """
        opened = open_bank(bank_file, device=device)  # the file's one read
        key = _backbone_key(opened.record.config)
        shared = extractors.get(key) if extractors is not None and key is not None else None
        det = Detector.from_opened(opened, extractor=shared)
        del opened  # the file's arrays: the bank holds its own copy now
        # Score a whole served batch in one backbone call.
        det.read_with(dataclasses.replace(det.config.data, batch_size=batch))
        served = cls(det, make_runtime(kind, det, bank_file, threads), sha256)
        if extractors is not None and key is not None and shared is None:  # the onnx graph is built from it too
            extractors[key] = det.extractor
        return served

    def score(self, pixels: np.ndarray, want_mask: list[bool], want_map: list[bool]) -> list[dict[str, Any]]:
        """uint8 RGB [N, S, S, 3] -> one result dict per image (score, normalized, threshold, label, mask, map)."""
        scores, maps = self.runtime(pixels)
        verdict = self.decision.apply(scores, maps) if self.decision is not None else None
        threshold = self.decision.image_threshold if self.decision is not None else None
        out = []
        for i in range(len(scores)):
            row: dict[str, Any] = {"score": float(scores[i]), "normalized": None, "threshold": threshold, "label": None}
            if verdict is not None:
                row["normalized"] = float(verdict.normalized[i])
                row["label"] = LABELS[int(verdict.ng[i])]
                if want_mask[i]:
                    row["mask"] = mask_png(verdict.mask[i])
            elif want_mask[i]:
                row["mask"] = None
            if want_map[i]:
                row["map"] = grid_map(maps[i], FEATURE_STRIDE)
            out.append(row)
        return out

    def describe(self) -> dict[str, Any]:
        return {"bank_sha256": self.sha256, "runtime": self.runtime.name, "device": str(self.detector.bank.device)}
