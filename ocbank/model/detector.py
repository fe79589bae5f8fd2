"""Detector: the feature extractor and the bank behind one scikit-learn-style object.

    det = Detector(weights="imagenet", radius="auto").fit(train_images)
    pred = det.predict(images)          # pred.scores [N], pred.maps [N, S, S]
    det.calibrate(normal_images)        # OK/NG thresholds from normal images only
    det.save("bottle.h5"); det = Detector.load("bottle.h5")

``__init__`` stores and validates parameters; ``fit`` resets every fitted attribute
(names ending in ``_``) and returns self. Progress bars, checkpoints and resume are
the job layer's (:mod:`ocbank.jobs.build`), which drives :meth:`Detector.fit_steps`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..config import (
    PARAMETERS,
    BackboneConfig,
    BankConfig,
    Config,
    DataConfig,
    DecisionConfig,
    ScoringConfig,
    config_from_parameters,
    from_dict,
    load,
)
from ..data import Batch, make_loader
from ..data.inputs import Inputs, as_samples, tensor_batches
from ..data.loader import prefetched
from ..engine import ClusterBank, resolve_device
from ..engine.checkpoint import BankState
from ..errors import ConfigError, DataError, NotFittedError
from .builder import BankBuilder, FittedBank, training_order
from .calibration import Decision, calibrate_decision, conservative_quantile
from .features import FEATURE_DIM, FEATURE_STRIDE, FeatureExtractor
from .module import AnomalyModel, BankNearest
from .progress import FitProgress, FitStep, advance
from .radius import RadiusStats
from .record import BankRecord, BuildIdentity, OpenedBank, open_bank
from .scoring import GridScore, MapSpec

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Prediction:
    """What :meth:`Detector.predict` returns for N inputs (NaN / -1 where an input was unreadable)."""

    scores: np.ndarray  # [N] float32 raw image scores: the max patch distance to the bank
    maps: np.ndarray  # [N, S, S] float32 anomaly maps in the same units
    labels: np.ndarray | None = None  # [N] int8: 1 = NG, 0 = OK, -1 = unreadable; None if not calibrated
    normalized: np.ndarray | None = None  # [N] float32 score / image_threshold; None if not calibrated
    masks: np.ndarray | None = None  # [N, S, S] bool defect masks (map > pixel threshold); None if not calibrated
    skipped: tuple[int, ...] = ()  # input positions that could not be read


@dataclass
class ScoredBatch:
    """Results for the readable images of one loader batch."""

    indices: list[int]  # positions in the input sequence
    skipped: list[int]
    scores: np.ndarray  # [B]
    maps: np.ndarray  # [B, S, S]
    rgb: np.ndarray  # [B, S, S, 3] uint8, the cropped input
    masks: np.ndarray | None  # [B, S, S] uint8 ground truth, when asked for


class Detector:
    """WideResNet-50 patch features streamed into a :class:`ClusterBank`.

    Defaults are the method's; each parameter is a field of :class:`ocbank.config.Config`.

    Parameters
    ----------
    weights
        "imagenet", "none" (random, seeded: tests and demos only) or a ``.pth`` state dict.
    radius
        "auto" (p99 of nearest-other-patch distances) or a number.
    pool
        "none" (the method) or "avg3" (PatchCore's 3x3 averaging).
    sigma
        Gaussian blur of the maps in pixels.
    scoring_mode
        Image score from the distance grid: "nn" (its maximum, the method), "local_mean", "local_gauss".
    image_size
        Side S of the model input (the center crop).
    resize
        Side of the square resize before the crop (None: image_size * 256 / 224).
    device
        "cpu", "cuda", "cuda:N" or "auto".
    """

    def __init__(
        self,
        *,
        weights: str = BackboneConfig.weights,
        radius: float | str = BankConfig.radius,
        pool: str = BackboneConfig.pool,
        sigma: float = ScoringConfig.sigma,
        scoring_mode: str = ScoringConfig.mode,
        image_size: int = DataConfig.crop,
        resize: int | None = None,
        device: str = Config.device,
        autocast: str = BackboneConfig.autocast,
        radius_images: int = BankConfig.radius_images,
        seed: int = BankConfig.seed,
        max_centroids: int | None = BankConfig.max_centroids,
        false_alarm_rate: float = DecisionConfig.false_alarm_rate,
        batch_size: int = DataConfig.batch_size,
        num_workers: int = DataConfig.num_workers,
        extractor: FeatureExtractor | None = None,
    ) -> None:
        # Every keyword but the extractor is a Config field (config.PARAMETERS): read them once, by name.
        params = {name: value for name, value in locals().items() if name in PARAMETERS}
        config = config_from_parameters(**params)
        self._setup(config, extractor)

    def _setup(self, config: Config, extractor: FeatureExtractor | None) -> None:
        self.config = config
        self._extractor = extractor
        self._lock = threading.Lock()
        self._scorer: tuple[ClusterBank, Any, AnomalyModel] | None = None  # (bank, scoring, model)

    @classmethod
    def from_config(
        cls, config: Config | dict[str, Any] | str | os.PathLike[str], extractor: FeatureExtractor | None = None
    ) -> Detector:
        """A Detector for a :class:`Config`, a config dict, a YAML path or a bundled config name."""
        if isinstance(config, dict):
            config = from_dict(config, require_root=False)
        elif not isinstance(config, Config):
            config = load(config, require_root=False)
        det = cls.__new__(cls)
        det._setup(config, extractor)
        return det

    def __repr__(self) -> str:
        c = self.config
        bank = self._check_fitted(required=False)
        state = "not fitted" if bank is None else f"{len(bank)} centroids"
        return (
            f"Detector(weights={c.backbone.weights!r}, radius={c.bank.radius!r}, pool={c.backbone.pool!r}, "
            f"sigma={c.scoring.sigma}, image_size={c.image_size}, device={c.device!r}) [{state}]"
        )

    # ------------------------------------------------------------------ parts
    @property
    def extractor(self) -> FeatureExtractor:
        with self._lock:
            if self._extractor is None:
                bb = self.config.backbone
                device = resolve_device(self.config.device)  # autocast applies only if this is CUDA
                self._extractor = FeatureExtractor(weights=bb.weights, pool=bb.pool, device=device, autocast=bb.autocast)
            return self._extractor

    def _check_fitted(self, required: bool = True, context: str = "") -> ClusterBank | None:
        """The fitted bank; without one, NotFittedError (``context`` says what needed it), or None if not ``required``.

        The one fittedness check (``fit`` and ``load`` set ``bank_``; a failed fit removes it).
        """
        bank = self.__dict__.get("bank_")
        if bank is None and required:
            msg = f"this Detector has no bank yet{context}: call fit(images) or Detector.load(path) first."
            raise NotFittedError(msg)
        return bank

    @property
    def bank(self) -> ClusterBank:
        bank = self._check_fitted()
        assert bank is not None  # _check_fitted raised otherwise
        return bank

    @property
    def decision(self) -> Decision | None:
        """The calibrated OK/NG thresholds, or None."""
        return self.__dict__.get("decision_")

    def features(self, images: Any, with_masks: bool = False) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Yield (:class:`~ocbank.data.Batch`, patch features [B, h, w, 1536]) per loader batch.

        The batch holds ``index`` (input positions), ``skipped``, ``rgb`` and, with
        ``with_masks``, ``mask``. A batch whose images were all unreadable comes with an
        empty feature tensor.
        """
        if isinstance(images, torch.Tensor):
            batches: Iterable[Batch] = tensor_batches(images, self.config.image_size, self.config.data.batch_size)
        else:
            batches = make_loader(as_samples(images), self.config, with_masks=with_masks)
            if self.config.data.num_workers == 0:  # decode the next batch while the backbone runs
                batches = prefetched(batches)
        for batch in batches:
            yield batch, self.extractor(batch.image) if batch.index else torch.zeros((0, 0, 0, FEATURE_DIM))
            advance(len(batch.index) + len(batch.skipped))  # the open progress bar, once the batch is used

    # ------------------------------------------------------------------ build
    def _reset(self) -> None:
        self._scorer = None  # holds the old bank
        for key in [k for k in self.__dict__ if k.endswith("_") and not k.startswith("_")]:
            del self.__dict__[key]

    def _extract_into(self, inputs: Inputs, idx: list[int], builder: BankBuilder) -> Iterator[tuple[int, FitProgress]]:
        """Patch features of ``inputs[idx]`` fed to ``builder``, one loader batch at a time.

        Yields (position in ``idx`` just after the batch, what the batch did: images used and
        the names of the unreadable ones).
        """
        for batch, f in self.features(inputs.take(idx)):
            builder.feed(f, n_unreadable=len(batch.skipped))
            yield batch.end, FitProgress(len(batch.index), tuple(inputs.name(idx[i]) for i in batch.skipped))

    def radius_statistics(self, images: Any) -> RadiusStats:
        """The radius rule's percentiles (and interval) on the seeded radius sample of ``images``."""
        inputs = Inputs.of(as_samples(images))
        if not len(inputs):
            msg = "radius_statistics() got no images. Pass the training images."
            raise DataError(msg)
        with BankBuilder(self.config.replace(bank={"radius": "auto"}), len(inputs)) as builder:
            for _ in self._extract_into(inputs, builder.sample, builder):
                pass
            assert builder.radius_stats is not None  # the whole sample was fed, so the rule has run
            return builder.radius_stats

    def fit_steps(self, images: Any, start: int = 0) -> Iterator[FitStep]:
        """Stream training images into the bank, yielding after each loader batch.

        ``start`` > 0 continues a loaded checkpoint (its bank and radius) from that
        position of :func:`~ocbank.model.builder.training_order`; ``start`` = 0 resets the
        fitted state first. A fit that fails leaves no half-built state behind.
        """
        try:
            yield from self._fit_steps(images, start)
        except BaseException:
            self._reset()
            raise

    def _fit_steps(self, images: Any, start: int) -> Iterator[FitStep]:
        inputs = Inputs.of(images)
        n = len(inputs)
        if not n:
            msg = "fit() got no images. Pass at least one normal training image."
            raise DataError(msg)
        began = time.perf_counter()
        so_far = FitProgress()
        if start == 0:
            self._reset()
            builder = self.builder(n)
            # The radius sample is read on its own first (spooled, r chosen on it, then it enters
            # the bank first), so the rest's loader batches start where a checkpoint resumes.
            parts = [(0, builder.n_sample), (builder.n_sample, n)]
        else:
            self._check_fitted(context=f" (fit_steps(start={start}) continues a checkpoint)")
            builder = self.builder(n)
            parts = [(start, n)]
        order = training_order(n, self.config)
        with builder:
            for lo, hi in parts:
                for end, step in self._extract_into(inputs, order[lo:hi], builder):
                    so_far += step
                    if builder.phase == "bank" and "bank_" not in self.__dict__:
                        self.use_fitted(FittedBank(builder.bank, builder.radius_stats))  # a checkpoint can be saved now
                    yield FitStep(builder.phase, lo + end, n, replace(so_far, seconds=time.perf_counter() - began))
            self.use_fitted(builder.finish())
        self.fit_summary_ = replace(so_far, seconds=time.perf_counter() - began)

    def builder(self, n_images: int) -> BankBuilder:
        """The :class:`~ocbank.model.builder.BankBuilder` for ``n_images`` more training images:
        streaming on into this detector's bank when it has one, else a new fit (its radius sample first).
        Its result comes back with :meth:`use_fitted`."""
        bank = self._check_fitted(required=False)
        if bank is None:
            return BankBuilder(self.config, n_images)
        return BankBuilder.continuing(self.config, FittedBank(bank, self.__dict__.get("radius_stats_")))

    def use_fitted(self, fitted: FittedBank) -> None:
        """Take ``fitted`` (a builder's bank and radius rule, or a sharded build's merge) as this
        detector's bank. A bank other than the one held resets the fitted state first."""
        if fitted.bank is not self.__dict__.get("bank_"):
            self._reset()
        self._scorer = None  # holds the old bank
        self.bank_ = fitted.bank
        if fitted.radius_stats is not None:
            self.radius_stats_ = fitted.radius_stats

    def fit(self, images: Any) -> Detector:
        """Reset, then build the bank from normal training images; return self.

        ``images``: paths, PIL images, arrays, or a float tensor [N, 3, S, S] (RGB in [0, 1]).
        """
        for _ in self.fit_steps(images):
            pass
        return self

    def partial_fit(self, images: Any) -> Detector:
        """Stream more normal images into the bank at its radius (fits first if there is no bank)."""
        bank = self._check_fitted(required=False)
        if bank is None:
            return self.fit(images)
        inputs = Inputs.of(images)
        began = time.perf_counter()
        builder = self.builder(len(inputs))
        added = sum((step for _, step in self._extract_into(inputs, list(range(len(inputs))), builder)), FitProgress())
        added = replace(added, seconds=time.perf_counter() - began)
        self.fit_summary_ = self.__dict__.get("fit_summary_", FitProgress()) + added
        self.last_partial_fit_ = added
        return self

    # ------------------------------------------------------------------ score
    @property
    def scorer(self) -> AnomalyModel:
        """The :class:`~ocbank.model.module.AnomalyModel` that turns patch features into scores and maps:
        the bank's own search (:class:`~ocbank.model.module.BankNearest`) and ``scoring``'s settings.

        Built on first use and kept while the bank and the scoring settings stay the same.
        """
        bank, cfg = self.bank, self.config
        extractor = self.extractor
        scoring = (cfg.image_size, cfg.scoring)
        with self._lock:
            if self._scorer is None or self._scorer[0] is not bank or self._scorer[1] != scoring:
                model = AnomalyModel(extractor, BankNearest(bank), MapSpec.from_config(cfg), score=GridScore.from_config(cfg))
                self._scorer = (bank, scoring, model)
            return self._scorer[2]

    def score_batches(self, images: Any, with_masks: bool = False) -> Iterator[ScoredBatch]:
        """Stream results batch by batch (keeps memory flat on large test sets)."""
        scorer = self.scorer
        size = self.config.image_size
        for batch, feats in self.features(images, with_masks=with_masks):
            if not batch.index:
                empty_maps = np.zeros((0, size, size), np.float32)
                rgb = np.zeros((0, size, size, 3), np.uint8)
                yield ScoredBatch([], batch.skipped, np.zeros(0, np.float32), empty_maps, rgb, None)
                continue
            with torch.inference_mode():
                scores, maps = scorer.score_features(feats)
            yield ScoredBatch(batch.index, batch.skipped, scores.numpy(), maps.numpy(), batch.rgb, batch.mask)

    def predict(self, images: Any) -> Prediction:
        """Score one image, a sequence of images, or a float tensor batch [N, 3, S, S] (RGB in [0, 1]).

        Unreadable inputs get NaN scores and maps (and label -1) and are listed in ``skipped``.
        """
        n = images.shape[0] if isinstance(images, torch.Tensor) else len(as_samples(images))
        size = self.config.image_size
        scores = np.full(n, np.nan, dtype=np.float32)
        maps = np.full((n, size, size), np.nan, dtype=np.float32)
        skipped: list[int] = []
        for res in self.score_batches(images if isinstance(images, torch.Tensor) else as_samples(images)):
            scores[res.indices] = res.scores
            maps[res.indices] = res.maps
            skipped += res.skipped
        return self._decide(scores, maps, tuple(sorted(skipped)))

    def _decide(self, scores: np.ndarray, maps: np.ndarray, skipped: tuple[int, ...]) -> Prediction:
        decision = self.decision
        if decision is None:
            return Prediction(scores, maps, skipped=skipped)
        verdict = decision.apply(scores, maps)
        scored = np.isfinite(scores)
        labels = np.where(scored, verdict.ng, -1).astype(np.int8)
        masks = verdict.mask & scored[:, None, None]  # an input that was not scored has no defect pixels
        return Prediction(scores, maps, labels, verdict.normalized.astype(np.float32), masks, skipped)

    # ------------------------------------------------------------------ decide
    def calibrate(self, normal_images: Any, source: str = "folder") -> Detector:
        """Set OK/NG thresholds from normal images the bank never saw
        (:func:`~ocbank.model.calibration.calibrate_decision` on their scores and maps); return self."""
        pred = self.predict(normal_images)
        ok = np.isfinite(pred.scores)
        if not ok.any():
            msg = "none of the calibration images could be read. Pass normal images of this product."
            raise DataError(msg)
        self.decision_ = calibrate_decision(pred.scores[ok], pred.maps[ok], self.config.decision.false_alarm_rate, source)
        return self

    # ------------------------------------------------------------------ files
    def record(self) -> BankRecord:
        """What a bank file keeps beside the bank's arrays to restore this Detector (:meth:`restore` reads it
        back): config, radius rule, thresholds, update lineage, the build's identity, and the keys a loaded
        file had that this version does not know."""
        return BankRecord(
            config=self.config,
            decision=self.decision,
            radius_stats=self.__dict__.get("radius_stats_"),
            lineage=tuple(self.__dict__.get("lineage_", ())),
            build=self.__dict__.get("build_", BuildIdentity()),
            thresholds_predate_update=self.__dict__.get("thresholds_predate_update_"),
            other=self.__dict__.get("other_metadata_", {}),
        )

    def metadata(self) -> dict[str, Any]:
        """A bank file's metadata: the :meth:`record`, and what the bank and backbone are now
        (:data:`~ocbank.model.record.DESCRIBED_KEYS`)."""
        size = self.config.image_size
        described = {
            "backbone": self.extractor.describe(),
            "feature_grid": [size // FEATURE_STRIDE, size // FEATURE_STRIDE],
            "image_size": size,
            "radius": self.bank.radius_,
            "search_backend": self.bank.search_backend,
        }
        return {**self.record().to_metadata(), **described}

    def restore(self, state: BankState, record: BankRecord) -> None:
        """Take ``state`` as the bank (on the record's device, searching as its config says) and
        ``record``'s config, radius rule, thresholds, lineage and build identity."""
        self.config = record.config
        self._scorer = None  # holds the old bank
        self.bank_ = ClusterBank.from_state(
            state, device=resolve_device(self.config.device), **self.config.bank.search_options
        )
        for key in ("radius_stats_", "decision_", "lineage_", "build_", "thresholds_predate_update_", "other_metadata_"):
            self.__dict__.pop(key, None)
        if record.radius_stats is not None:
            self.radius_stats_ = record.radius_stats
        if record.decision is not None:
            self.decision_ = record.decision
        if record.lineage:
            self.lineage_ = list(record.lineage)
        self.build_ = record.build
        if record.thresholds_predate_update is not None:
            self.thresholds_predate_update_ = record.thresholds_predate_update
        if record.other:
            self.other_metadata_ = dict(record.other)

    def read_with(self, data: DataConfig) -> None:
        """Read images with ``data``'s settings from now on (folder, batch size, workers). The resize
        and crop make the features the bank holds, so they must stay the bank's."""
        now = self.config.data
        if (data.resize, data.image_size) != (now.resize, now.image_size):
            msg = (
                f"data settings with resize {data.resize} and image size {data.image_size} would change the features "
                f"of a bank built with {now.resize} and {now.image_size}. Keep the bank's data.resize and data.crop."
            )
            raise ConfigError(msg)
        self.config = replace(self.config, data=data)

    def clone(self) -> Detector:
        """A copy sharing this Detector's backbone, with its own bank (the same state), record and fit summary."""
        copy = Detector.from_config(self.config, extractor=self.extractor)
        copy.restore(self.bank.state(), self.record())
        if "fit_summary_" in self.__dict__:
            copy.fit_summary_ = self.fit_summary_
        return copy

    def note_update(self, entry: dict[str, Any], thresholds_predate_update: bool) -> None:
        """Record an update (new images streamed in): its lineage ``entry``, whether the thresholds are
        now older than the bank, and the build's summary brought up to date."""
        self.lineage_ = [*self.__dict__.get("lineage_", []), entry]
        self.thresholds_predate_update_ = thresholds_predate_update
        build = self.__dict__.get("build_", BuildIdentity())
        if build.summary is not None:
            bank = self.bank
            summary = {**build.summary, "n_centroids": len(bank), "bank_bytes": bank.nbytes, "updates": len(self.lineage_)}
            self.build_ = replace(build, summary=summary)

    @property
    def is_fitted(self) -> bool:
        """Whether this Detector has a bank (from fit, partial_fit or load)."""
        return self._check_fitted(required=False) is not None

    def save(
        self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None, *, build: BuildIdentity | None = None
    ) -> None:
        """One HDF5 file: the bank plus its :meth:`metadata` (atomic).

        ``build``: the build identity to write (default: the one loaded with the bank);
        ``extra``: more metadata keys, written over the detector's own.
        """
        meta = self.metadata()
        if build is not None:
            meta = {k: v for k, v in meta.items() if k not in BuildIdentity.keys()} | build.to_dict()
        meta.update(extra or {})
        self.bank.save(path, metadata=meta)

    @classmethod
    def from_opened(cls, opened: OpenedBank, extractor: FeatureExtractor | None = None) -> Detector:
        """A Detector holding a bank file read by :func:`ocbank.model.record.open_bank`."""
        det = cls.from_config(opened.record.config, extractor=extractor)
        det.restore(opened.state, opened.record)
        return det

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | None = None,
        extractor: FeatureExtractor | None = None,
        *,
        allow_partial: bool = False,
    ) -> Detector:
        """Rebuild a Detector from a file written by :meth:`save` (or ``ocbank build``), checked by
        :func:`~ocbank.model.record.open_bank` (an unfinished checkpoint only with ``allow_partial``)."""
        opened = open_bank(path, allow_partial=allow_partial, device=device)
        if opened.unfinished:
            log.warning("scoring with the unfinished checkpoint %s (allow_partial)", path)
        return cls.from_opened(opened, extractor)


__all__ = ["Decision", "Detector", "FitStep", "Prediction", "ScoredBatch", "as_samples", "conservative_quantile"]
