"""ocbank: online cluster memory banks on FAISS for visual anomaly detection."""

from __future__ import annotations

from typing import Any

from ._faiss import faiss as _faiss  # noqa: F401  (fails early with the install hint)
from ._version import __version__
from .bank import ClusterBank
from .checkpoint import CheckpointError

__all__ = ["CheckpointError", "ClusterBank", "Detector", "__version__"]


def __getattr__(name: str) -> Any:
    # The Detector pulls in torch/torchvision; import it only when asked for.
    if name == "Detector":
        from .detector import Detector  # noqa: PLC0415

        return Detector
    msg = f"module 'ocbank' has no attribute {name!r}"
    raise AttributeError(msg)
