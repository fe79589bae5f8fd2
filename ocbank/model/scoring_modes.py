"""Image scores from a cluster bank's patch distances beyond plain "max of the 1-NN grid".

Measured on identical features against the full PatchCore bank (benchmarks/scoring_modes.py,
benchmarks/results/modes_*): the modes kept here are the ones that closed the gap.

- ``local_mean_max``: image score = max over the patch grid of the mean over each
  ``window`` x ``window`` neighbourhood (edges replicated). A centroid stands in for its
  members, so single-patch distances carry an approximation error of up to about r;
  a defect covers several neighbouring patches while that error does not, so averaging
  over the neighbourhood before the max keeps the defect and cancels part of the error.
- ``edge_exemplars`` / ``with_exemplars``: keep, raw, the training patches that sit
  farthest from their own centroid (the members a centroid represents worst) and take
  the smaller of the distance to the nearest centroid and to the nearest exemplar.

Pure numpy functions, no bank state beyond arrays: distances [N], grids [B, h, w],
training patches [n, C], centroid means [K, C] and the nearest-centroid index of each
training patch [n].
"""

from __future__ import annotations

import numpy as np

from ..config import SCORING_MODES
from ..errors import ConfigError, InputError

MODES = SCORING_MODES  # the config's choices for scoring.mode
GAUSS_TRUNCATE = 4.0  # kernel radius in sigmas (scipy's default)


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
        msg = f"window must be an odd integer >= 1, got {window!r}. Use 3 (the measured default) or 1 (off)."
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
        msg = f"sigma must be > 0 patches, got {sigma!r}. Use 1.0 (the measured default)."
        raise ConfigError(msg)
    return gaussian_filter(grid.astype(np.float64), sigma=(0, sigma, sigma), mode="nearest", truncate=GAUSS_TRUNCATE)


def edge_exemplars(residuals: np.ndarray, fraction: float) -> np.ndarray:
    """Indices [E] of the training patches farthest from their nearest centroid: the top ``fraction``.

    residuals: [n] each training patch's distance to its nearest centroid (``bank.search(x)[0][:, 0]``
    after the build). E = min(ceil(fraction * n), number of residuals > 0): patches at distance 0
    (e.g. singleton centroids) are never kept. Ties go to the lower index; the result is sorted.
    """
    residuals = np.asarray(residuals, dtype=np.float64)
    if residuals.ndim != 1 or not np.all(np.isfinite(residuals)):
        msg = f"residuals must be a finite [n] array, got shape {residuals.shape!r}. Pass the 1-NN distances."
        raise InputError(msg)
    if not 0 <= fraction <= 1:
        msg = f"exemplar fraction must be in [0, 1], got {fraction!r}. Use e.g. 0.02 (2% of the training patches)."
        raise ConfigError(msg)
    e = min(int(np.ceil(fraction * len(residuals))), int(np.count_nonzero(residuals > 0)))
    order = np.lexsort((np.arange(len(residuals)), -residuals))  # largest residual first, then lower index
    return np.sort(order[:e])


def with_exemplars(bank_dist: np.ndarray, exemplar_dist: np.ndarray | None) -> np.ndarray:
    """[N] distance to the nearest centroid, [N] to the nearest exemplar (or None) -> [N] the smaller."""
    if exemplar_dist is None:
        return np.asarray(bank_dist)
    if np.shape(bank_dist) != np.shape(exemplar_dist):
        msg = f"distance arrays must match, got {np.shape(bank_dist)!r} and {np.shape(exemplar_dist)!r}."
        raise InputError(msg)
    return np.minimum(bank_dist, exemplar_dist)


def image_scores(grid: np.ndarray, mode: str = "nn", window: int = 3, sigma: float = 1.0) -> np.ndarray:
    """[B, h, w] patch distances -> [B] image scores.

    ``nn``: the grid's maximum (PatchCore); ``local_mean``: the maximum of the ``window`` x ``window``
    neighbourhood means; ``local_gauss``: the maximum after a Gaussian blur of ``sigma`` patches.
    """
    grid = _grid(grid)
    if mode == "nn":
        return grid.reshape(len(grid), -1).max(axis=1).astype(np.float64)
    if mode == "local_mean":
        return local_mean_max(grid, window)
    if mode == "local_gauss":
        return local_gauss(grid, sigma).reshape(len(grid), -1).max(axis=1)
    msg = f"scoring mode must be one of {MODES}, got {mode!r}. Use 'nn' (default), 'local_mean' or 'local_gauss'."
    raise ConfigError(msg)
