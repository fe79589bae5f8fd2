"""Heatmap overlays as PNG."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import escape_path


def map_range(radius: float) -> tuple[float, float]:
    """The overlays' colour scale for a bank of radius ``radius``: 0 .. 2 r, the same for every image."""
    return 0.0, 2.0 * radius


def overlay(rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45) -> np.ndarray:
    """rgb uint8 [S, S, 3] + map [S, S] -> uint8 [S, S, 3] with a jet heatmap blended in."""
    from matplotlib import colormaps  # noqa: PLC0415

    norm = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = colormaps["jet"](norm)[..., :3]
    blend = (1 - alpha) * rgb.astype(np.float32) / 255.0 + alpha * heat
    return (np.clip(blend, 0, 1) * 255).astype(np.uint8)


def save_overlay(
    path: str | Path, rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None
) -> None:
    """Write the overlay (and, with a mask, the ground truth beside it) as a PNG."""
    panels = [rgb, overlay(rgb, amap, vmin, vmax)]
    if mask is not None:
        panels.append(np.repeat((mask > 0)[..., None] * 255, 3, axis=2).astype(np.uint8))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


def write_output(target: Path, write: Callable[[Path], None]) -> bool:
    """Write one output file with ``write(target)``; a failure is named in one warning and loses no other output."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(target)
    except OSError as exc:
        warnings.warn(f"could not write {escape_path(target)}: {exc.strerror or exc}", stacklevel=2)
        return False
    return True
