"""Patch distances -> image scores and anomaly maps, in torch: the maths of :class:`~ocbank.model.module.AnomalyModel`.

Image scores from the [B, h, w] grid of 1-NN distances, under ``scoring.mode`` (:class:`GridScore`):

- ``nn``: the grid's maximum (the method, PatchCore's).
- ``local_mean``: the maximum of the means over each ``window`` x ``window`` neighbourhood
  (edges replicated). A centroid stands in for its members, so single-patch distances carry
  an approximation error of up to about r; a defect covers several neighbouring patches while
  that error does not, so averaging before the max keeps the defect and cancels part of the error.
- ``local_gauss``: the maximum after a Gaussian blur of ``sigma`` patches over the grid.

Compared on identical features against the full PatchCore bank in benchmarks/scoring_modes.py
(benchmarks/results/modes_*). Maps (:class:`AnomalyMap`): bilinear upsampling to the crop,
then the Gaussian blur of :class:`GaussianBlur` (the exported graph's).

Every smoothing here is a separable linear map, so each runs as two matrix products with an
[n, n] operator per axis (:func:`line_operator`). The functions at the end (:func:`image_scores`,
:func:`anomaly_maps`, ...) take and give numpy arrays for callers that hold grids from
elsewhere (benchmarks, baselines); they run these modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import SCORING_MODES
from ..errors import ConfigError, InputError

MODES = SCORING_MODES  # the config's choices for scoring.mode
TRUNCATE = 4.0  # kernel radius in sigmas (scipy.ndimage.gaussian_filter's default)


def kernel_radius(sigma: float) -> int:
    """scipy's kernel half-width for ``sigma``: int(4 sigma + 0.5) (16 for sigma = 4)."""
    return int(TRUNCATE * float(sigma) + 0.5)


def gaussian_weights(sigma: float) -> torch.Tensor:
    """float64 [2r + 1] weights exp(-i^2 / 2 sigma^2) / sum, as scipy builds them ([1] for sigma = 0)."""
    r = kernel_radius(sigma)
    if r == 0:
        return torch.ones(1, dtype=torch.float64)
    i = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (i / float(sigma)) ** 2)
    return torch.from_numpy(w / w.sum())


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """:func:`gaussian_weights` in float32 (the map blur's kernel)."""
    return gaussian_weights(sigma).float()


def line_operator(weights: torch.Tensor, n: int, border: str) -> torch.Tensor:
    """float64 [n, n] matrix B with ``x @ B`` = scipy's ``correlate1d(x, weights, mode=border)`` along x's last axis.

    Entry B[i, j] is the weight of input i in output j: the kernel (odd length, centred) laid over
    the extension of the line beyond its ends. ``border`` "reflect" is scipy's half-sample symmetric
    extension (``c b a | a b c``, period 2n, so any radius works, even r > n); "nearest" repeats the
    edge (``a a a | a b c``).
    """
    k = weights.double()
    r = (k.numel() - 1) // 2
    out = torch.zeros((n, n), dtype=torch.float64)
    j = torch.arange(n)
    for t in range(-r, r + 1):
        if border == "reflect":
            i = torch.remainder(j + t, 2 * n)
            i = torch.where(i >= n, 2 * n - 1 - i, i)  # mirror, edge repeated
        elif border == "nearest":
            i = torch.clamp(j + t, 0, n - 1)
        else:
            msg = f"border must be 'reflect' or 'nearest', got {border!r}. Use one of scipy's modes named here."
            raise ValueError(msg)
        out.index_put_((i, j), k[t + r].expand(n), accumulate=True)
    return out


def blur_operator(sigma: float, n: int) -> torch.Tensor:
    """float32 [n, n] matrix B with ``x @ B`` = scipy's 1-D gaussian_filter1d of each row of x [.., n] (mode 'reflect')."""
    return line_operator(gaussian_kernel(sigma), n, "reflect").float()


class _Separable(nn.Module):
    """[.., H, W] -> [.., H, W]: ``B_H^T @ m @ B_W`` with :func:`line_operator` matrices, built once per side length."""

    def __init__(self, weights: torch.Tensor, border: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.weights, self.border, self.dtype = weights, border, dtype
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def operator(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, device)
        if key not in self._cache:  # built once per side and device, kept (a few KB to a few MB)
            self._cache[key] = line_operator(self.weights, n, self.border).to(device, self.dtype)
        return self._cache[key]

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        h, w = int(grid.shape[-2]), int(grid.shape[-1])
        along_w = torch.matmul(grid, self.operator(w, grid.device))
        return torch.matmul(self.operator(h, grid.device).T, along_w)


class GaussianBlur(nn.Module):
    """Maps [N, H, W] -> [N, H, W]: scipy's ``gaussian_filter(m, sigma)`` (truncate 4, mode 'reflect').

    The separable blur, border included, is linear: along W it is ``m @ B_W``,
    along H ``B_H^T @ m`` (see :func:`blur_operator`). Two matrix products run as
    batched GEMMs (no per-image loop as with scipy, no 1-channel conv2d; bench_export.py
    compares them), export as two MatMul nodes with constant [S, S] initializers, and match
    scipy's half-sample symmetric border exactly (``F.pad(mode="reflect")``
    does not repeat the edge, so it would change the map along the border).
    ``size`` precomputes the operator for square S x S maps (the exported graph's).
    """

    def __init__(self, sigma: float, size: int | None = None) -> None:
        super().__init__()
        number = isinstance(sigma, (int, float)) and not isinstance(sigma, bool)
        if not (number and math.isfinite(sigma) and sigma >= 0):
            msg = f"scoring.sigma must be a finite number >= 0, got {sigma!r}. Use 4 (PatchCore's) or 0 for no blur."
            raise ConfigError(msg)
        self.sigma = float(sigma)
        self.radius = kernel_radius(sigma)
        self.size = size
        op = blur_operator(sigma, size) if size and self.radius else torch.zeros(0)
        self.register_buffer("operator", op, persistent=False)
        self._cache: dict[int, torch.Tensor] = {}

    def _operator(self, n: int) -> torch.Tensor:
        if n == self.size:
            return self.operator
        if n not in self._cache:  # other sizes: built once, kept (a few KB to a few MB)
            self._cache[n] = blur_operator(self.sigma, n)
        return self._cache[n]

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return maps
        h, w = int(maps.shape[-2]), int(maps.shape[-1])
        along_w = torch.matmul(maps, self._operator(w).to(maps.device, maps.dtype))
        return torch.matmul(self._operator(h).to(maps.device, maps.dtype).T, along_w)


@dataclass(frozen=True)
class MapSpec:
    """How distance grids become maps: the map side S (the crop size) and the blur's sigma in pixels."""

    size: int
    sigma: float = 4.0

    @classmethod
    def from_config(cls, config: Any) -> MapSpec:
        """A :class:`~ocbank.config.Config`'s crop size and ``scoring.sigma``."""
        return cls(size=config.image_size, sigma=config.scoring.sigma)


class AnomalyMap(nn.Module):
    """Distances [N, h, w] -> maps [N, S, S]: bilinear upsampling (align_corners=False), then :class:`GaussianBlur`."""

    def __init__(self, spec: MapSpec) -> None:
        super().__init__()
        self.spec = spec
        self.blur = GaussianBlur(spec.sigma, spec.size)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        s = self.spec.size
        up = F.interpolate(grid[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0]
        return self.blur(up)


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
        msg = f"window must be an odd integer >= 1, got {window!r}. Use 3 (the default: a patch and its neighbours) or 1 (off)."
        raise ConfigError(msg)


def _check_grid_sigma(sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and math.isfinite(sigma) and sigma > 0):
        msg = f"sigma must be > 0 patches, got {sigma!r}. Use 1.0 (the default: one patch)."
        raise ConfigError(msg)


class GridScore(nn.Module):
    """Distances [N, h, w] -> image scores [N] under ``mode`` (see the module's docstring).

    ``nn`` keeps the grid's dtype (the maximum is one of its values); ``local_mean`` and
    ``local_gauss`` smooth in float64 (edges repeated, as scipy's mode "nearest") and return float64.
    ``window`` (odd, patches) is local_mean's; ``sigma`` (> 0, patches) local_gauss's, its kernel
    truncated at :data:`TRUNCATE` sigmas and normalised (scipy.ndimage.gaussian_filter).
    """

    def __init__(self, mode: str = "nn", window: int = 3, sigma: float = 1.0) -> None:
        super().__init__()
        if mode not in MODES:
            msg = f"scoring mode must be one of {MODES}, got {mode!r}. Use 'nn' (default), 'local_mean' or 'local_gauss'."
            raise ConfigError(msg)
        self.mode = mode
        self.smooth: _Separable | None = None
        if mode == "local_mean":
            _check_window(window)
            self.smooth = _Separable(torch.full((int(window),), 1.0 / int(window), dtype=torch.float64), "nearest",
                                     torch.float64)
        elif mode == "local_gauss":
            _check_grid_sigma(sigma)
            self.smooth = _Separable(gaussian_weights(sigma), "nearest", torch.float64)

    @classmethod
    def from_config(cls, config: Any) -> GridScore:
        """A :class:`~ocbank.config.Config`'s ``scoring.mode``, ``window`` and ``grid_sigma``."""
        s = config.scoring
        return cls(s.mode, s.window, s.grid_sigma)

    def smoothed(self, grid: torch.Tensor) -> torch.Tensor:
        """[N, h, w] -> [N, h, w]: the grid the maximum is taken over (itself for ``nn``; float64 otherwise)."""
        return grid if self.smooth is None else self.smooth(grid.double())

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.smoothed(grid).flatten(1), dim=1)


# ---------------------------------------------------------------------- numpy in, numpy out
def _grid(grid: np.ndarray) -> torch.Tensor:
    grid = np.asarray(grid)
    if grid.ndim != 3 or grid.shape[0] == 0 or grid.shape[1] == 0 or grid.shape[2] == 0:
        msg = f"expected a non-empty [B, h, w] distance grid, got shape {grid.shape!r}. Reshape the 1-NN distances."
        raise InputError(msg)
    return torch.from_numpy(np.ascontiguousarray(grid))


def local_mean(grid: np.ndarray, window: int = 3) -> np.ndarray:
    """[B, h, w] patch distances -> float64 [B, h, w] means over each ``window`` x ``window`` neighbourhood."""
    scorer = GridScore("local_mean", window=window)
    with torch.inference_mode():
        return scorer.smoothed(_grid(grid)).numpy()


def local_mean_max(grid: np.ndarray, window: int = 3) -> np.ndarray:
    """[B, h, w] patch distances -> [B] image scores: the maximum of :func:`local_mean`."""
    return image_scores(grid, "local_mean", window=window)


def local_gauss(grid: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """[B, h, w] -> float64 [B, h, w]: a Gaussian blur over the patch grid (``sigma`` in patches, edges repeated)."""
    scorer = GridScore("local_gauss", sigma=sigma)
    with torch.inference_mode():
        return scorer.smoothed(_grid(grid)).numpy()


def image_scores(grid: np.ndarray, mode: str = "nn", window: int = 3, sigma: float = 1.0) -> np.ndarray:
    """[B, h, w] patch distances -> [B] image scores under ``mode`` (:class:`GridScore`)."""
    scorer = GridScore(mode, window, sigma)
    with torch.inference_mode():
        return scorer(_grid(grid)).numpy()


@lru_cache(maxsize=8)
def _blur(sigma: float) -> GaussianBlur:
    return GaussianBlur(sigma)  # keeps its [S, S] operators per map size: build once, reuse


@lru_cache(maxsize=8)
def _map(size: int, sigma: float) -> AnomalyMap:
    return AnomalyMap(MapSpec(size, sigma))


def blur_maps(maps: np.ndarray | torch.Tensor, sigma: float) -> np.ndarray:
    """[B, H, W] -> float32 [B, H, W]: ``scipy.ndimage.gaussian_filter(m, sigma)`` per map, batched (:class:`GaussianBlur`)."""
    t = torch.as_tensor(np.ascontiguousarray(maps, dtype=np.float32))
    with torch.inference_mode():
        return _blur(float(sigma))(t).numpy()


def anomaly_maps(dist_grid: np.ndarray, size: int, sigma: float = 4.0) -> np.ndarray:
    """[B, h, w] distances -> [B, size, size] float32 maps (:class:`AnomalyMap`; sigma in pixels, 0 = no blur)."""
    grid = torch.from_numpy(np.ascontiguousarray(dist_grid, dtype=np.float32))
    with torch.inference_mode():
        return _map(int(size), float(sigma))(grid).numpy()
