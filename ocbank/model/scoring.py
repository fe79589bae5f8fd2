"""Patch distances -> image scores and anomaly maps."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def image_scores(dist_grid: np.ndarray) -> np.ndarray:
    """[B, h, w] 1-NN distances -> [B] image scores (the maximum over the grid)."""
    return dist_grid.reshape(dist_grid.shape[0], -1).max(axis=1)


def anomaly_maps(dist_grid: np.ndarray, size: int, sigma: float = 4.0) -> np.ndarray:
    """[B, h, w] distances -> [B, size, size] float32 maps.

    Bilinear upsampling to the crop size, then a Gaussian blur with ``sigma``
    pixels (PatchCore's sigma = 4).
    """
    grid = torch.from_numpy(np.ascontiguousarray(dist_grid, dtype=np.float32))[:, None]
    up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma > 0:
        up = np.stack([gaussian_filter(m, sigma=sigma) for m in up])
    return up.astype(np.float32, copy=False)
