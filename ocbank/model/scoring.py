"""Patch distances -> image scores and anomaly maps.

Image scores from the [B, h, w] grid of 1-NN distances, under ``scoring.mode``:

- ``nn``: the grid's maximum (the method, PatchCore's).
- ``local_mean``: the maximum of the means over each ``window`` x ``window`` neighbourhood
  (edges replicated). A centroid stands in for its members, so single-patch distances carry
  an approximation error of up to about r; a defect covers several neighbouring patches while
  that error does not, so averaging before the max keeps the defect and cancels part of the error.
- ``local_gauss``: the maximum after a Gaussian blur of ``sigma`` patches over the grid.

Measured on identical features against the full PatchCore bank (benchmarks/scoring_modes.py,
benchmarks/results/modes_*). Maps: bilinear upsampling to the crop, then the Gaussian blur
of :class:`~ocbank.model.module.GaussianBlur` (the exported graph's).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..config import SCORING_MODES
from ..errors import ConfigError, InputError
from .module import GaussianBlur

MODES = SCORING_MODES  # the config's choices for scoring.mode
GAUSS_TRUNCATE = 4.0  # kernel radius in sigmas (scipy's default)


@lru_cache(maxsize=8)
def _blur(sigma: float) -> GaussianBlur:
    return GaussianBlur(sigma)  # keeps its [S, S] operators per map size: build once, reuse


def _grid(grid: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid)
    if grid.ndim != 3 or grid.shape[0] == 0 or grid.shape[1] == 0 or grid.shape[2] == 0:
        msg = f"expected a non-empty [B, h, w] distance grid, got shape {grid.shape!r}. Reshape the 1-NN distances."
        raise InputError(msg)
    return grid


def local_mean(grid: np.ndarray, window: int = 3) -> np.ndarray:
    """[B, h, w] patch distances -> [B, h, w] means over each ``window`` x ``window`` neighbourhood.

    ``window`` is odd; cells beyond the grid's edge repeat the edge (scipy's "nearest").
    Computed with float64 cumulative sums, so the result does not depend on the window's position.
    """
    grid = _grid(grid)
    if window < 1 or window % 2 == 0:
        msg = f"window must be an odd integer >= 1, got {window!r}. Use 3 (the default: a patch and its neighbours) or 1 (off)."
        raise ConfigError(msg)
    if window == 1:
        return grid.astype(np.float64)
    p = window // 2
    padded = np.pad(grid.astype(np.float64), ((0, 0), (p, p), (p, p)), mode="edge")
    c = np.zeros((padded.shape[0], padded.shape[1] + 1, padded.shape[2] + 1))
    c[:, 1:, 1:] = padded.cumsum(axis=1).cumsum(axis=2)
    h, w = grid.shape[1:]
    s = c[:, window:, window:] - c[:, :h, window:] - c[:, window:, :w] + c[:, :h, :w]
    return s / (window * window)


def local_mean_max(grid: np.ndarray, window: int = 3) -> np.ndarray:
    """[B, h, w] patch distances -> [B] image scores: the maximum of :func:`local_mean`."""
    return local_mean(grid, window).reshape(len(grid), -1).max(axis=1)


def local_gauss(grid: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """[B, h, w] -> [B, h, w]: a Gaussian blur over the patch grid (``sigma`` in patches, edges repeated).

    The kernel is truncated at ``GAUSS_TRUNCATE`` sigmas and normalised (scipy.ndimage.gaussian_filter).
    """
    from scipy.ndimage import gaussian_filter  # noqa: PLC0415

    grid = _grid(grid)
    if not sigma > 0:
        msg = f"sigma must be > 0 patches, got {sigma!r}. Use 1.0 (the default: one patch)."
        raise ConfigError(msg)
    return gaussian_filter(grid.astype(np.float64), sigma=(0, sigma, sigma), mode="nearest", truncate=GAUSS_TRUNCATE)


def image_scores(grid: np.ndarray, mode: str = "nn", window: int = 3, sigma: float = 1.0) -> np.ndarray:
    """[B, h, w] patch distances -> [B] image scores under ``mode`` (see the module's docstring).

    ``nn`` keeps the grid's dtype (the maximum is one of its values); the other modes are float64.
    """
    grid = _grid(grid)
    if mode == "nn":
        return grid.reshape(len(grid), -1).max(axis=1)
    if mode == "local_mean":
        return local_mean_max(grid, window)
    if mode == "local_gauss":
        return local_gauss(grid, sigma).reshape(len(grid), -1).max(axis=1)
    msg = f"scoring mode must be one of {MODES}, got {mode!r}. Use 'nn' (default), 'local_mean' or 'local_gauss'."
    raise ConfigError(msg)


def blur_maps(maps: np.ndarray | torch.Tensor, sigma: float) -> np.ndarray:
    """[B, H, W] -> float32 [B, H, W]: ``scipy.ndimage.gaussian_filter(m, sigma)`` per map, batched in torch.

    The same :class:`~ocbank.model.module.GaussianBlur` the exported graph uses.
    """
    t = torch.as_tensor(np.ascontiguousarray(maps, dtype=np.float32))
    blur = _blur(float(sigma))
    with torch.inference_mode():
        return blur(t).numpy()


def anomaly_maps(dist_grid: np.ndarray, size: int, sigma: float = 4.0) -> np.ndarray:
    """[B, h, w] distances -> [B, size, size] float32 maps.

    Bilinear upsampling to the crop size (align_corners=False), then a Gaussian
    blur with ``sigma`` pixels (PatchCore's sigma = 4; 0 = no blur).
    """
    grid = torch.from_numpy(np.ascontiguousarray(dist_grid, dtype=np.float32))[:, None]
    with torch.inference_mode():
        up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return blur_maps(up, sigma)
