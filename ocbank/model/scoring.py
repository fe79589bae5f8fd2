"""Patch distances -> image scores and anomaly maps."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .module import GaussianBlur


@lru_cache(maxsize=8)
def _blur(sigma: float) -> GaussianBlur:
    return GaussianBlur(sigma)  # keeps its [S, S] operators per map size: build once, reuse


def image_scores(dist_grid: np.ndarray) -> np.ndarray:
    """[B, h, w] 1-NN distances -> [B] image scores (the maximum over the grid)."""
    return dist_grid.reshape(dist_grid.shape[0], -1).max(axis=1)


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
