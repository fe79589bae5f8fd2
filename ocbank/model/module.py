"""The whole scoring path as one pure torch module: image -> patch features -> 1-NN -> score, map.

:class:`AnomalyModel` is the one image -> (score, map) computation, shaped like anomalib's
``PatchcoreModel``: feature extraction, a nearest-neighbour search, then the image score and the
map (:mod:`ocbank.model.scoring`). The search is a :class:`NearestDistance`:

- :class:`MatmulNearest`: exact 1-NN by matrix products on the bank's means held as buffers.
  No faiss and no numpy in forward, so the whole model exports as one graph (ONNX, OpenVINO)
  or runs with torch alone: ``ocbank export``, the onnxruntime serving runtime, the anomalib adapter.
- :class:`BankNearest`: the live :class:`~ocbank.engine.ClusterBank`'s own search (faiss, torch or numpy,
  IVF where the bank uses it): :meth:`Detector.predict <ocbank.model.detector.Detector.predict>`
  and with it the torch serving runtime. Not exportable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.images import normalize
from ..engine import ClusterBank
from ..errors import ConfigError, InputError
from .calibration import Decision
from .features import FeatureExtractor, backbone_layers, patch_head
from .scoring import AnomalyMap, GaussianBlur, GridScore, MapSpec

OUTPUT_NAMES = ("score", "map")
DECISION_OUTPUT_NAMES = ("label", "normalized", "mask")


class NearestDistance(nn.Module):
    """Patch features [N, h, w, D] -> distance to the nearest bank centroid [N, h, w] (plain L2)."""

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MatmulNearest(NearestDistance):
    """Exact 1-NN by matrix products on buffers: the means transposed [D, K] and their squared norms [K].

    The distance is sqrt(max(||q||^2 + min_k(||mu_k||^2 - 2 q.mu_k), 0)). The buffers are the
    exported graph's initializers and the anomalib adapter's state dict.
    """

    def __init__(self, means: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        mu = means.detach() if torch.is_tensor(means) else torch.from_numpy(np.array(means, dtype=np.float32))
        mu = mu.to("cpu", torch.float32).contiguous()
        if mu.ndim != 2 or mu.shape[0] == 0:
            msg = f"means must be a non-empty [K, dim] array, got shape {tuple(mu.shape)!r}. Build the bank first."
            raise InputError(msg)
        # Stored as [D, K], the MatMul's layout: the graph's initializer is then this buffer itself.
        self.register_buffer("means_t", mu.T.contiguous())
        self.register_buffer("means_sq", (mu.double() ** 2).sum(1).float())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # min_k(||mu||^2 - 2 q.mu) first, then + ||q||^2: one [.., K] reduction, no [.., K] add.
        part = torch.amin(self.means_sq - 2.0 * torch.matmul(feats, self.means_t), dim=-1)
        d2 = (feats * feats).sum(-1) + part
        return torch.sqrt(torch.clamp(d2, min=0.0))


class BankNearest(NearestDistance):
    """The bank's own 1-NN search (:meth:`ClusterBank.search`, faiss, torch or numpy): float32 distances on the CPU.

    The bank is held, not copied, so it follows later adds.
    """

    def __init__(self, bank: ClusterBank) -> None:
        super().__init__()
        self.bank = bank

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        dist, _ = self.bank.search(feats.reshape(-1, feats.shape[-1]), k=1)
        return torch.from_numpy(dist).reshape(feats.shape[:-1])


class AnomalyModel(nn.Module):
    """RGB crops [N, 3, S, S] in [0, 1] -> (score [N], map [N, S, S]) [+ label, normalized, mask].

    The extractor's stem/layer2/layer3 (shared, not copied), a :class:`NearestDistance` search,
    the image score (:class:`~ocbank.model.scoring.GridScore`, ``scoring.mode``; the method's
    grid maximum by default) and the map (:class:`~ocbank.model.scoring.AnomalyMap`).
    :meth:`score_features` is the step from patch features on, which callers with their own
    feature pipeline (``Detector.predict``) run. With a
    :class:`~ocbank.model.calibration.Decision`, three more outputs (its ``apply``):
    label int64 [N] (1 = NG), normalized float32 [N] (score / image_threshold) and mask uint8 [N, S, S].
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        nearest: NearestDistance,
        spec: MapSpec,
        decision: Decision | None = None,
        score: GridScore | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(nearest, NearestDistance):
            msg = (
                f"nearest must be a NearestDistance, got {type(nearest).__name__}. "
                "Wrap the bank's means in MatmulNearest(means) or the bank in BankNearest(bank)."
            )
            raise InputError(msg)
        if spec.size % 8 or spec.size <= 0:
            msg = f"the map size must be a positive multiple of the stride 8, got {spec.size!r}. Fix data.crop."
            raise ConfigError(msg)
        self.stem, self.layer2, self.layer3 = extractor.stem, extractor.layer2, extractor.layer3
        self.pool = extractor.pool
        self.spec = spec
        self.decision = decision
        self.nearest = nearest
        self.score = GridScore() if score is None else score
        self.anomaly_map = AnomalyMap(spec)
        self.eval()  # buffers on the CPU; the shared layers stay where the extractor put them

    @property
    def blur(self) -> GaussianBlur:
        return self.anomaly_map.blur

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + (DECISION_OUTPUT_NAMES if self.decision is not None else ())

    def patch_features(self, image: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] RGB in [0, 1] -> [N, S/8, S/8, 1536], as FeatureExtractor (in float32)."""
        return patch_head(*backbone_layers(self, normalize(image)), self.pool)

    def distances(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, h, w, D] -> 1-NN distance to the bank [N, h, w] (plain L2), by this model's search."""
        return self.nearest(feats)

    def score_and_map(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, h, w] distances -> (image scores [N] in the grid's dtype, maps [N, S, S])."""
        return self.score(grid).to(grid.dtype), self.anomaly_map(grid)

    def score_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, h, w, D] patch features -> (scores [N], maps [N, S, S]): the search, then :meth:`score_and_map`."""
        return self.score_and_map(self.distances(feats))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, maps = self.score_features(self.patch_features(image))
        if self.decision is None:
            return scores, maps
        verdict = self.decision.apply(scores, maps)
        return scores, maps, verdict.ng.to(torch.int64), verdict.normalized, verdict.mask.to(torch.uint8)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # State dicts written before the search became a submodule hold its buffers at this level.
        for name in ("means_t", "means_sq"):
            if prefix + name in state_dict and prefix + "nearest." + name not in state_dict:
                state_dict[prefix + "nearest." + name] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
