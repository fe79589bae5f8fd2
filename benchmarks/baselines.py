"""PaDiM and SPADE on the harness's features (layer2 + upsampled layer3 of WideResNet-50, 1536-d).

PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for
Anomaly Detection and Localization", ICPR 2021): a multivariate Gaussian per
feature-grid position. The paper's WRN50 setting concatenates layer1-3
(1792-d) and keeps 550 random dimensions; our features are layer2+layer3
(1536-d), so we keep 550 seeded random dimensions of those 1536. Covariance
is the unbiased sample covariance + 0.01·I (the paper's regulariser), the
patch score is the Mahalanobis distance at its own position, maps are
upsampled + Gaussian blur σ = 4 and, as in the authors' reference code, the
image score is the maximum of the blurred map.

SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid
Correspondences", 2020): image level, kNN on globally average-pooled
features with K = 50 nearest normal images (the paper's setting; capped at
the number of training images) and the mean distance to them as the image
score; pixel level, the mean distance of each test patch to its κ = 1
nearest patch among all positions of those K images (the paper's κ). The
paper pools the backbone's last block; we pool the harness's 1536-d patch
features, the only features every method here shares. The SPADE-pytorch
re-implementation uses K = 5 for both stages: pass ``k_images=5`` for that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ocbank.engine._faiss import faiss
from ocbank.errors import ConfigError, InputError

PADIM_DIMS = 550  # Defard et al., WRN50 setting
PADIM_EPS = 0.01  # Defard et al., covariance regulariser
SPADE_K_IMAGES = 50  # Cohen & Hoshen, image-level K
SPADE_KAPPA = 1  # Cohen & Hoshen, pixel-level κ


def _check_grid(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[0] == 0:
        msg = f"{name} must be a non-empty [n, h, w, C] feature array, got shape {x.shape!r}. Pass patch-feature grids."
        raise InputError(msg)
    return x


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, C], [m, C] -> [n, m] squared L2 distances (float64 accumulation, clamped at 0)."""
    a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    d = (a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None, :] - 2.0 * a64 @ b64.T
    return np.maximum(d, 0.0)


@dataclass(frozen=True)
class PadimParams:
    dims: int = PADIM_DIMS
    eps: float = PADIM_EPS
    seed: int = 0
    chunk: int = 64  # grid positions per float64 block (bounds peak memory)


class Padim:
    """A Gaussian per grid position on ``dims`` seeded random channels."""

    def __init__(self, params: PadimParams | None = None) -> None:
        self.params = params or PadimParams()
        if self.params.dims < 1 or not self.params.eps > 0:
            msg = f"PaDiM needs dims >= 1 and eps > 0, got {self.params!r}. Use the defaults (550, 0.01)."
            raise ConfigError(msg)

    def fit(self, train: np.ndarray) -> Padim:
        """train: [n, h, w, C] features, n >= 2 -> mean [h*w, d], precision [h*w, d, d] (float32)."""
        train = _check_grid(train, "train")
        n, h, w, c = train.shape
        if n < 2:
            msg = f"PaDiM needs at least 2 training images for a covariance, got {n}. Add training images."
            raise InputError(msg)
        d = min(self.params.dims, c)
        rng = np.random.default_rng(self.params.seed)
        self.channels = np.sort(rng.choice(c, size=d, replace=False))
        x = train.reshape(n, h * w, c)[:, :, self.channels]  # [n, P, d]
        self.shape = (h, w)
        self.mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)  # [P, d]
        self.precision = np.empty((h * w, d, d), dtype=np.float32)
        eye = np.eye(d)
        for lo in range(0, h * w, self.params.chunk):
            xc = x[:, lo : lo + self.params.chunk].astype(np.float64) - self.mean[lo : lo + self.params.chunk]
            xt = xc.transpose(1, 0, 2)  # [p, n, d]; batched matmul (BLAS), not einsum's plain loops
            cov = np.matmul(xt.transpose(0, 2, 1), xt) / (n - 1) + self.params.eps * eye  # [p, d, d]
            self.precision[lo : lo + self.params.chunk] = np.linalg.inv(cov)
        return self

    @property
    def nbytes(self) -> int:
        return int(self.mean.nbytes + self.precision.nbytes)

    def score(self, test: np.ndarray) -> tuple[np.ndarray, None]:
        """test: [m, h, w, C] -> (Mahalanobis grid [m, h, w], None: image score = max of the blurred map)."""
        test = _check_grid(test, "test")
        m, h, w, c = test.shape
        if (h, w) != self.shape:
            msg = f"PaDiM was fitted on a {self.shape} grid, got {(h, w)!r}. Use the same image size."
            raise InputError(msg)
        delta = test.reshape(m, h * w, c)[:, :, self.channels] - self.mean  # [m, P, d]
        out = np.empty((m, h * w), dtype=np.float64)
        for lo in range(0, h * w, self.params.chunk):
            dc = np.ascontiguousarray(delta[:, lo : lo + self.params.chunk].transpose(1, 0, 2))  # [p, m, d]
            proj = np.matmul(dc, self.precision[lo : lo + self.params.chunk])  # [p, m, d]
            out[:, lo : lo + self.params.chunk] = np.einsum("pmj,pmj->mp", proj, dc, dtype=np.float64)
        return np.sqrt(np.maximum(out, 0.0)).reshape(m, h, w).astype(np.float32), None


@dataclass(frozen=True)
class SpadeParams:
    k_images: int = SPADE_K_IMAGES
    kappa: int = SPADE_KAPPA


class Spade:
    """Image kNN on pooled features, then patch kNN against the K nearest images' patches."""

    def __init__(self, params: SpadeParams | None = None) -> None:
        self.params = params or SpadeParams()
        if self.params.k_images < 1 or self.params.kappa < 1:
            msg = f"SPADE needs k_images >= 1 and kappa >= 1, got {self.params!r}. Use the defaults (50, 1)."
            raise ConfigError(msg)

    def fit(self, train: np.ndarray) -> Spade:
        """train: [n, h, w, C] -> keeps every patch [n, h*w, C] and pooled features [n, C]."""
        train = _check_grid(train, "train")
        n, h, w, c = train.shape
        self.patches = np.ascontiguousarray(train.reshape(n, h * w, c), dtype=np.float32)
        self.pooled = self.patches.mean(axis=1, dtype=np.float64).astype(np.float32)
        self.k = min(self.params.k_images, n)
        return self

    @property
    def nbytes(self) -> int:
        return int(self.patches.nbytes + self.pooled.nbytes)

    def score(self, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """test: [m, h, w, C] -> (patch scores [m, h, w], image scores [m])."""
        test = _check_grid(test, "test")
        m, h, w, c = test.shape
        flat = test.reshape(m, h * w, c)
        d_img = np.sqrt(_sq_dists(flat.mean(axis=1, dtype=np.float64), self.pooled))  # [m, n]
        nearest = np.argsort(d_img, axis=1, kind="stable")[:, : self.k]  # [m, K]
        image = np.take_along_axis(d_img, nearest, axis=1).mean(axis=1)
        kappa = min(self.params.kappa, self.k * self.patches.shape[1])
        grid = np.empty((m, h * w), dtype=np.float64)
        for i in range(m):  # the same flat FAISS search as every other bank of the harness
            gallery = np.ascontiguousarray(self.patches[nearest[i]].reshape(-1, c))  # [K*h*w, C]
            sq, _ = faiss.knn(np.ascontiguousarray(flat[i], dtype=np.float32), gallery, kappa)
            grid[i] = np.sqrt(np.maximum(sq, 0.0)).mean(axis=1)
        return grid.reshape(m, h, w).astype(np.float32), image
