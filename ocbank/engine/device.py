"""Which device a bank and a model run on: ``"cpu" | "cuda" | "cuda:N" | "auto"`` made concrete."""

from __future__ import annotations

from ..errors import DeviceError


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU (faiss need not: a CUDA bank can search with torch)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device: str) -> str:
    """Map ``"cpu" | "cuda" | "cuda:N" | "auto"`` to a concrete device string; :class:`DeviceError` without CUDA."""
    if device == "cpu":
        return "cpu"
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if not cuda_available():
        msg = (
            f"device={device!r} was requested, but torch sees no CUDA GPU. "
            "Use device='cpu' (or 'auto'), or install a CUDA build of torch."
        )
        raise DeviceError(msg)
    return device
