"""ocbank: online cluster memory banks on FAISS for visual anomaly detection."""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .engine import ClusterBank
from .engine._faiss import faiss as _faiss  # noqa: F401  (fails early with the install hint)
from .errors import CheckpointError, OcbankError

__all__ = ["CheckpointError", "ClusterBank", "Detector", "OcbankError", "__version__"]


def __getattr__(name: str) -> Any:
    # The Detector pulls in torch/torchvision; import it only when asked for.
    if name == "Detector":
        from .model.detector import Detector  # noqa: PLC0415

        return Detector
    msg = f"module 'ocbank' has no attribute {name!r}"
    raise AttributeError(msg)
