"""The whole scoring path as one pure torch module: image -> patch features -> 1-NN -> score, map.

:class:`AnomalyModel` needs no faiss (and no numpy in forward), so it can be
exported as one graph (ONNX, OpenVINO) or run with torch alone.
:class:`GaussianBlur` is the one implementation of the map blur;
:func:`ocbank.model.scoring.anomaly_maps` uses it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import normalize
from ..errors import ConfigError, InputError
from .calibration import Decision
from .features import FeatureExtractor, backbone_layers, patch_head

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default
OUTPUT_NAMES = ("score", "map")
DECISION_OUTPUT_NAMES = ("label", "normalized", "mask")


def kernel_radius(sigma: float) -> int:
    """scipy's kernel half-width for ``sigma``: int(4 sigma + 0.5) (16 for sigma = 4)."""
    return int(TRUNCATE * float(sigma) + 0.5)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """float32 [2r + 1] weights exp(-i^2 / 2 sigma^2) / sum, as scipy builds them ([1] for sigma = 0)."""
    r = kernel_radius(sigma)
    if r == 0:
        return torch.ones(1, dtype=torch.float32)
    i = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (i / float(sigma)) ** 2)
    return torch.from_numpy(w / w.sum()).float()


def blur_operator(sigma: float, n: int) -> torch.Tensor:
    """float32 [n, n] matrix B with ``x @ B`` = scipy's 1-D gaussian_filter1d of each row of x [.., n].

    Entry B[i, j] is the weight of input i in output j: the kernel laid over the
    half-sample symmetric extension of the line (scipy's 'reflect': ``c b a | a b c``,
    repeated with period 2n, so any radius works, even r > n).
    """
    k = gaussian_kernel(sigma).double()
    r = (k.numel() - 1) // 2
    out = torch.zeros((n, n), dtype=torch.float64)
    j = torch.arange(n)
    for t in range(-r, r + 1):
        i = torch.remainder(j + t, 2 * n)
        i = torch.where(i >= n, 2 * n - 1 - i, i)  # mirror, edge repeated
        out.index_put_((i, j), k[t + r].expand(n), accumulate=True)
    return out.float()


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
        along_w = torch.matmul(maps, self._operator(w).to(maps.dtype))
        return torch.matmul(self._operator(h).to(maps.dtype).T, along_w)


@dataclass(frozen=True)
class MapSpec:
    """How distance grids become maps: the map side S (the crop size) and the blur's sigma in pixels."""

    size: int
    sigma: float = 4.0


class AnomalyModel(nn.Module):
    """RGB crops [N, 3, S, S] in [0, 1] -> (score [N], map [N, S, S]) [+ label, normalized, mask].

    The extractor's stem/layer2/layer3 (shared, not copied), the bank's means
    (transposed, [1536, K]) and their squared norms [K] as buffers. The 1-NN distance is
    sqrt(max(||q||^2 + min_k(||mu_k||^2 - 2 q.mu_k), 0)): matrix products only.
    With a :class:`~ocbank.model.calibration.Decision`, three more outputs (its ``apply``):
    label int64 [N] (1 = NG), normalized float32 [N] (score / image_threshold) and mask uint8 [N, S, S].
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        means: np.ndarray | torch.Tensor,
        spec: MapSpec,
        decision: Decision | None = None,
    ) -> None:
        super().__init__()
        mu = means.detach() if torch.is_tensor(means) else torch.from_numpy(np.array(means, dtype=np.float32))
        mu = mu.to("cpu", torch.float32).contiguous()
        if mu.ndim != 2 or mu.shape[0] == 0:
            msg = f"means must be a non-empty [K, dim] array, got shape {tuple(mu.shape)!r}. Build the bank first."
            raise InputError(msg)
        if spec.size % 8 or spec.size <= 0:
            msg = f"the map size must be a positive multiple of the stride 8, got {spec.size!r}. Fix data.crop."
            raise ConfigError(msg)
        self.stem, self.layer2, self.layer3 = extractor.stem, extractor.layer2, extractor.layer3
        self.pool = extractor.pool
        self.spec = spec
        self.decision = decision
        self.blur = GaussianBlur(spec.sigma, spec.size)
        # Stored as [D, K], the MatMul's layout: the graph's initializer is then this buffer itself.
        self.register_buffer("means_t", mu.T.contiguous())
        self.register_buffer("means_sq", (mu.double() ** 2).sum(1).float())
        self.eval()  # buffers on the CPU; the shared layers stay where the extractor put them

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + (DECISION_OUTPUT_NAMES if self.decision is not None else ())

    def patch_features(self, image: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] RGB in [0, 1] -> [N, S/8, S/8, 1536], as FeatureExtractor (in float32)."""
        return patch_head(*backbone_layers(self, normalize(image)), self.pool)

    def distances(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, h, w, D] -> 1-NN distance to the means [N, h, w] (plain L2)."""
        # min_k(||mu||^2 - 2 q.mu) first, then + ||q||^2: one [.., K] reduction, no [.., K] add.
        part = torch.amin(self.means_sq - 2.0 * torch.matmul(feats, self.means_t), dim=-1)
        d2 = (feats * feats).sum(-1) + part
        return torch.sqrt(torch.clamp(d2, min=0.0))

    def maps(self, grid: torch.Tensor) -> torch.Tensor:
        """[N, h, w] distances -> [N, S, S]: bilinear upsample (align_corners=False), then the blur."""
        s = self.spec.size
        up = F.interpolate(grid[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0]
        return self.blur(up)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grid = self.distances(self.patch_features(image))
        scores = torch.amax(grid.flatten(1), dim=1)
        maps = self.maps(grid)
        if self.decision is None:
            return scores, maps
        verdict = self.decision.apply(scores, maps)
        return scores, maps, verdict.ng.to(torch.int64), verdict.normalized, verdict.mask.to(torch.uint8)
