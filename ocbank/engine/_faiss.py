"""Import FAISS once, with an error that says which package to install."""

from __future__ import annotations

from types import ModuleType


def import_faiss() -> ModuleType:
    """Return the ``faiss`` module or raise an ImportError naming the fix."""
    try:
        import faiss  # noqa: PLC0415
    except ImportError as exc:
        msg = (
            "ocbank needs FAISS, and no faiss module was found. "
            "Install exactly one of: pip install 'ocbank[cpu]' (faiss-cpu) or "
            "pip install 'ocbank[gpu]' (the official faiss-gpu build)."
        )
        raise ImportError(msg) from exc
    except RuntimeError as exc:  # a GPU wheel whose CUDA libraries are missing
        msg = (
            f"faiss is installed but failed to load: {exc}. A faiss-gpu wheel needs its "
            "nvidia-*-cu12 runtime libraries; reinstall with pip install 'ocbank[gpu]', "
            "or use pip install 'ocbank[cpu]' on a machine without CUDA."
        )
        raise ImportError(msg) from exc
    return faiss


faiss = import_faiss()


def faiss_has_gpu() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
