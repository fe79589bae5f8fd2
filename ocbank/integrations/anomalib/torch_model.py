"""OCBank's torch model: the Detector's backbone and bank for training, AnomalyModel for prediction
and export, and the bank as buffers so a Lightning checkpoint restores it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from anomalib.data import InferenceBatch
from torch import nn

from ...engine.checkpoint import BankState
from ...errors import NotFittedError
from ...model.builder import BankBuilder, FittedBank
from ...model.detector import Detector
from ...model.features import FEATURE_DIM
from ...model.module import AnomalyModel, MatmulNearest
from ...model.record import BankRecord
from ...model.scoring import GridScore, MapSpec

# Keys of the checkpoint's ocbank entry that hold the bank's own state (the rest is its record, as in a bank file).
_BANK_EXTRAS = ("spread_known", "radius_growth", "radius_history")


class OCBankModel(nn.Module):
    """anomalib's torch model for :class:`OCBank`: RGB [N, 3, S, S] in [0, 1] -> InferenceBatch.

    ``scorer`` is ocbank's :class:`AnomalyModel` (backbone layers shared with the
    detector's extractor; the bank's means as buffers); ``detector.bank_`` is the live
    :class:`ClusterBank` that training streams into. The buffers ``counts`` [K],
    ``m2`` [K], ``radius`` and ``n_seen`` (with the scorer's means) are the bank in the
    state dict, so a Lightning checkpoint restores it into a fresh model.
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        config = detector.config
        self.spec = MapSpec.from_config(config)
        # An unfitted scorer holds one placeholder centroid; forward refuses it (counts is empty).
        self.scorer = self._scorer(np.zeros((1, FEATURE_DIM), np.float32))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("m2", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("radius", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("n_seen", torch.tensor(0, dtype=torch.int64))
        self._builder: BankBuilder | None = None  # this epoch's fitting (Detector.builder)
        self.pending = False  # images streamed since the last publish
        self.checkpoint_extras: dict[str, Any] = {}  # set by OCBank.on_load_checkpoint
        self.register_load_state_dict_post_hook(OCBankModel._after_load)

    def _scorer(self, means: np.ndarray) -> AnomalyModel:
        """The exportable AnomalyModel over ``means`` [K, 1536] (GEMM search) with the config's scoring."""
        det = self.detector
        return AnomalyModel(det.extractor, MatmulNearest(means), self.spec, score=GridScore.from_config(det.config))

    def train(self, mode: bool = True) -> OCBankModel:
        """Lightning's train mode: the flag only. The backbone stays in eval (frozen batch norm), as ocbank's."""
        super().train(mode)
        self.scorer.eval()
        return self

    @property
    def fitted(self) -> bool:
        return self.counts.numel() > 0

    # ------------------------------------------------------------------ training
    @property
    def needs_radius_sample(self) -> bool:
        """Whether the next epoch starts a bank whose radius comes from the seeded radius sample."""
        return not self.detector.is_fitted and self.detector.config.bank.radius == "auto"

    def begin(self, n_images: int) -> list[int]:
        """Start an epoch of ``n_images`` training images: a new bank, or, when there is one, stream
        on into it (ocbank's update). Returns the radius sample's positions among them, which are
        to be fed first (:meth:`add_images`); none with a numeric radius or a fitted bank."""
        self.abandon()  # an epoch that ended in an exception leaves its builder (and spool) behind
        self._builder = self.detector.builder(n_images)
        return self._builder.sample

    @property
    def fitting(self) -> bool:
        """Whether an epoch's fit is open (between :meth:`begin` and :meth:`finish`)."""
        return self._builder is not None

    @torch.no_grad()
    def add_images(self, images: torch.Tensor) -> None:
        """One training batch [B, 3, S, S] (RGB in [0, 1], pre-processed) into the fit (:meth:`begin` first)."""
        if self._builder is None:
            msg = "OCBankModel.add_images() came before begin(n_images). Train through anomalib's Engine.fit."
            raise NotFittedError(msg)
        self.pending = True
        self._builder.feed(self.scorer.patch_features(images))  # [B, h, w, 1536]

    def publish_so_far(self) -> None:
        """A validation inside the epoch: publish what the epoch has fed so far; the fit goes on."""
        builder = self._builder
        if builder is not None and builder.bank is not None:
            self.detector.use_fitted(FittedBank(builder.bank, builder.radius_stats))
        if self.detector.is_fitted:
            self.publish()

    def finish(self) -> None:
        """End of an epoch: the radius rule on a sample still open (fewer images came than it was
        sized for), the bank to the detector, then publish."""
        builder, self._builder = self._builder, None
        if builder is not None:
            with builder:
                self.detector.use_fitted(builder.finish())  # DataError when no image came
        self.publish()

    def abandon(self) -> None:
        """Drop an open fit (its radius-sample spool included); the detector keeps the bank it had."""
        builder, self._builder = self._builder, None
        if builder is not None:
            builder.close()

    def publish(self) -> None:
        """Copy the live bank into the scorer and the buffers (what prediction, export and checkpoints use)."""
        self.pending = False
        state = self.detector.bank.state()
        device = self.counts.device
        self.scorer = self._scorer(state.means).to(device)
        self.counts = torch.from_numpy(np.asarray(state.counts, np.int64)).to(device)
        self.m2 = torch.from_numpy(np.asarray(state.m2, np.float64)).to(device)
        self.radius = torch.tensor(state.radius, dtype=torch.float64, device=device)
        self.n_seen = torch.tensor(state.n_seen, dtype=torch.int64, device=device)

    # ------------------------------------------------------------------ pickling (anomalib's torch export)
    def __getstate__(self) -> dict[str, Any]:
        # The live Detector holds locks and a faiss-backed bank: pickle what rebuilds them instead.
        state = dict(super().__getstate__())
        det = state.pop("detector")
        state["_builder"] = None
        state["_detector"] = {
            "config": det.config,
            "extractor": det.extractor,
            "extras": self.extras() if self.fitted else {},
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("_detector")
        super().__setstate__(state)
        self.detector = Detector.from_config(saved["config"], extractor=saved["extractor"])
        self.checkpoint_extras = saved["extras"]
        if self.fitted:
            self.restore_bank()

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The bank's size is data: take the incoming shapes before the default copy.
        search = self.scorer.nearest
        for owner, name in ((self, "counts"), (self, "m2"), (search, "means_t"), (search, "means_sq")):
            # the search's buffers, or where checkpoints written before it was a submodule hold them
            keys = [prefix + name] if owner is self else [prefix + f"scorer.nearest.{name}", prefix + f"scorer.{name}"]
            key = next((k for k in keys if k in state_dict), None)
            if key is not None:
                setattr(owner, name, torch.empty_like(state_dict[key], device=self.counts.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _after_load(module: OCBankModel, incompatible: Any) -> None:
        del incompatible
        if module.fitted:
            module.restore_bank()

    def restore_bank(self) -> None:
        """Rebuild the detector's ClusterBank (and metadata) from the buffers and checkpoint extras."""
        det = self.detector
        extras = dict(self.checkpoint_extras)
        bank = {key: extras.pop(key) for key in _BANK_EXTRAS if key in extras}
        # The rest is the bank file's record; a malformed config or decision: ConfigError, as on load.
        record = BankRecord.from_metadata({"config": det.config.to_dict(), **extras}, "<anomalib checkpoint>")
        state = BankState(
            means=self.scorer.nearest.means_t.T.contiguous().cpu().numpy(),
            counts=self.counts.cpu().numpy(),
            radius=float(self.radius),
            dim=FEATURE_DIM,
            n_seen=int(self.n_seen),
            m2=self.m2.cpu().numpy(),
            spread_known=bool(bank.get("spread_known", True)),
            max_centroids=record.config.bank.max_centroids,
            radius_growth=float(bank.get("radius_growth", 1.25)),
            radius_history=list(bank.get("radius_history", [])),
        )
        det.restore(state, record)

    def extras(self) -> dict[str, Any]:
        """What the state dict does not hold: the full config, radius rule, cap history, thresholds, lineage."""
        det = self.detector
        bank = det.bank
        return {
            **det.record().to_metadata(),
            "spread_known": bank.spread_known_,
            "radius_growth": bank.radius_growth,
            "radius_history": bank.radius_history_,
        }

    # ------------------------------------------------------------------ prediction
    def forward(self, images: torch.Tensor) -> InferenceBatch:
        if not self.fitted:
            msg = "this OCBank has no bank yet: fit it (Engine.fit), load a checkpoint, or use OCBank.from_bank(path)."
            raise NotFittedError(msg)
        score, amap = self.scorer(images)[:2]
        return InferenceBatch(pred_score=score, anomaly_map=amap[:, None])
