"""Which device a bank and a model run on: ``"cpu" | "cuda" | "cuda:N" | "auto"`` made concrete."""

from __future__ import annotations

from ..errors import DeviceError
from ._faiss import faiss_has_gpu


def cuda_available() -> bool:
    """True when both torch and faiss see a CUDA GPU."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return False
    return bool(torch.cuda.is_available()) and faiss_has_gpu()


def resolve_device(device: str) -> str:
    """Map ``"cpu" | "cuda" | "cuda:N" | "auto"`` to a concrete device string; :class:`DeviceError` without CUDA."""
    if device == "cpu":
        return "cpu"
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if not cuda_available():
        msg = (
            f"device={device!r} was requested, but no CUDA GPU is visible to both torch and "
            "faiss. Use device='cpu' (or 'auto'), or install the GPU build: pip install '.[gpu]'."
        )
        raise DeviceError(msg)
    return device
