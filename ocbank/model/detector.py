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
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import (
    BackboneConfig,
    BankConfig,
    Config,
    DataConfig,
    DecisionConfig,
    ScoringConfig,
    from_dict,
    load,
)
from ..data import Batch, Sample, make_loader, normalize
from ..data.images import check_unit_range
from ..data.loader import prefetched
from ..engine import ClusterBank, resolve_device
from ..engine.checkpoint import BankState
from ..errors import DataError, InputError, InputTypeError, NotFittedError
from .calibration import Decision, conservative_quantile
from .features import FEATURE_DIM, FEATURE_STRIDE, FeatureExtractor
from .module import AnomalyModel, BankNearest
from .progress import FitProgress, FitStep, advance
from .radius import RadiusStats, estimate_radius, sample_images
from .record import BankRecord, BuildIdentity, OpenedBank, open_bank
from .scoring import GridScore, MapSpec
from .spool import FeatureSpool

log = logging.getLogger(__name__)

ImageLike = Any  # a path, a PIL image, or an image array [H, W(, C)]

# Radius-sample features held in memory before the spool spills to a memory-mapped file.
SPOOL_MEMORY_BYTES = 2 << 30

# Resize-to-crop ratio of the MVTec convention (256 -> 224), used when only image_size is given.
_RESIZE_RATIO = DataConfig.resize / DataConfig.crop


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


def _is_single_image(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike, Image.Image, Sample)) or (
        isinstance(images, np.ndarray) and images.dtype != object and images.ndim in (2, 3)
    )


def as_samples(images: Any) -> list[Sample]:
    """One image or a sequence of images (paths, PIL images, arrays, Samples) -> samples."""
    if _is_single_image(images):
        images = [images]
    if isinstance(images, (bytes, dict)) or not isinstance(images, (Sequence, np.ndarray)):
        msg = (
            f"images must be an image (path, PIL image, array) or a sequence of them, got {type(images).__name__}. "
            "Pass a list, or a float tensor [N, 3, S, S]."
        )
        raise InputTypeError(msg)
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Sample):
            out.append(im)
        elif isinstance(im, (str, os.PathLike, Image.Image, np.ndarray)):
            out.append(Sample(im))
        else:
            msg = f"images[{i}] is a {type(im).__name__}; each image must be a path, a PIL image or an array."
            raise InputTypeError(msg)
    return out


def _in_unit_range(part: torch.Tensor, offset: int) -> tuple[list[int], list[int]]:
    """Split a tensor batch [n, 3, S, S] by the float-pixel rule arrays and files follow
    (:func:`ocbank.data.images.check_unit_range`): (kept positions, skipped input indices).

    Each image outside the rule is skipped and named, as an unreadable file or array is.
    """
    flat = part.reshape(part.shape[0], -1)
    lows, highs = flat.amin(1).tolist(), flat.amax(1).tolist()  # NaN propagates into both
    keep, skipped = [], []
    for i, (lo, hi) in enumerate(zip(lows, highs, strict=True)):
        try:
            check_unit_range(lo, hi, f"tensor[{offset + i}]")
            keep.append(i)
        except DataError as exc:
            warnings.warn(f"skipping image: {exc}", stacklevel=3)
            skipped.append(offset + i)
    return keep, skipped


@dataclass(frozen=True)
class _Inputs:
    """Training inputs as either samples or a preprocessed tensor [N, 3, S, S], taken by index."""

    samples: list[Sample] | None = None
    tensor: torch.Tensor | None = None

    @classmethod
    def of(cls, images: Any) -> _Inputs:
        return cls(tensor=images) if isinstance(images, torch.Tensor) else cls(samples=as_samples(images))

    def __len__(self) -> int:
        return self.tensor.shape[0] if self.tensor is not None else len(self.samples or [])

    def take(self, idx: list[int]) -> Any:
        if self.tensor is not None:
            return self.tensor[torch.as_tensor(idx, dtype=torch.long)]
        return [self.samples[i] for i in idx]

    def name(self, i: int) -> str:
        if self.tensor is not None:
            return f"tensor[{i}]"
        path = self.samples[i].path  # a file by its path, an in-memory image by its position
        return str(path) if isinstance(path, (str, bytes, os.PathLike)) else f"images[{i}]"


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
        if resize is None:
            resize = round(image_size * _RESIZE_RATIO) if isinstance(image_size, int) else image_size
        config = Config(
            data=DataConfig(resize=resize, crop=image_size, batch_size=batch_size, num_workers=num_workers),
            backbone=BackboneConfig(weights=weights, pool=pool, autocast=autocast),
            bank=BankConfig(radius=radius, radius_images=radius_images, seed=seed, max_centroids=max_centroids),
            scoring=ScoringConfig(sigma=sigma, mode=scoring_mode),
            decision=DecisionConfig(false_alarm_rate=false_alarm_rate),
            device=device,
            source="<Detector>",
        )
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

    def _tensor_batches(self, batch: torch.Tensor) -> Iterator[Batch]:
        """A preprocessed float tensor [N, 3, S, S] (RGB in [0, 1]) in loader-sized pieces."""
        size = self.config.image_size
        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != (size, size):
            msg = f"a tensor batch must be [N, 3, {size}, {size}] (RGB in [0, 1], resized and cropped), got {tuple(batch.shape)}."
            raise InputError(msg)
        if not batch.is_floating_point():
            msg = f"a tensor batch must be floating point RGB in [0, 1], got dtype {batch.dtype}. Divide uint8 by 255."
            raise InputTypeError(msg)
        step = self.config.data.batch_size
        for lo in range(0, batch.shape[0], step):
            part = batch[lo : lo + step].float()
            keep, skipped = _in_unit_range(part, lo)
            if skipped:
                part = part[keep]  # indexing with a list copies: only when something was left out
            part = part.contiguous()  # one memory layout, one conv kernel
            rgb = (part.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            yield Batch([lo + i for i in keep], skipped, normalize(part), rgb)

    def features(self, images: Any, with_masks: bool = False) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Yield (:class:`~ocbank.data.Batch`, patch features [B, h, w, 1536]) per loader batch.

        The batch holds ``index`` (input positions), ``skipped``, ``rgb`` and, with
        ``with_masks``, ``mask``. A batch whose images were all unreadable comes with an
        empty feature tensor.
        """
        if isinstance(images, torch.Tensor):
            batches: Iterable[Batch] = self._tensor_batches(images)
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

    def training_order(self, n_images: int) -> list[int]:
        """The order images stream into the bank: with ``radius: auto``, the radius sample first.

        The sample's features are buffered while they stream, the radius is chosen from
        them, and they enter the bank before the rest, so no image is read twice.
        """
        if self.config.bank.radius != "auto":
            return list(range(n_images))
        first = sample_images(n_images, self.config.bank.radius_images, self.config.bank.seed)
        chosen = set(first)
        return first + [i for i in range(n_images) if i not in chosen]

    def n_radius_images(self, n_images: int) -> int:
        return 0 if self.config.bank.radius != "auto" else min(n_images, self.config.bank.radius_images)

    def _extract_into(
        self, inputs: _Inputs, idx: list[int], sink: Callable[[torch.Tensor], Any]
    ) -> Iterator[tuple[int, FitProgress]]:
        """Patch features [n, 1536] of ``inputs[idx]`` into ``sink``, one loader batch at a time.

        Yields (position in ``idx`` just after the batch, what the batch did: images used and
        the names of the unreadable ones). The one loop of the radius sample, fit and partial_fit.
        """
        for batch, f in self.features(inputs.take(idx)):
            if batch.index:
                sink(f.reshape(-1, FEATURE_DIM))
            yield batch.end, FitProgress(len(batch.index), tuple(inputs.name(idx[i]) for i in batch.skipped))

    def _spool_sample(self, inputs: _Inputs, idx: list[int], spool: FeatureSpool) -> Iterator[tuple[int, FitProgress]]:
        """:meth:`_extract_into` into ``spool`` (the radius sample); DataError at the end when nothing was readable."""
        n_read = 0
        for end, step in self._extract_into(inputs, idx, lambda f: spool.append(f.cpu().numpy())):
            n_read += step.images_used
            yield end, step
        if not n_read:
            msg = f"none of the {len(idx)} radius-sample images could be read. Check the training images."
            raise DataError(msg)

    def _radius_stats(self, features: Any, n_images: int) -> RadiusStats:
        """The radius rule on features [n, 1536] (or a spool): linear-cost p99 with its interval."""
        estimate = estimate_radius(features, seed=self.config.bank.seed, search=self.config.bank.cpu_search)
        if not estimate.radius > 0:
            msg = f"the radius rule gave {estimate.radius} (identical patches?). Set bank.radius explicitly."
            raise DataError(msg)
        return RadiusStats(estimate.radius, estimate, n_images)

    def radius_statistics(self, images: Any) -> RadiusStats:
        """The radius rule's percentiles (and interval) on this detector's radius sample of ``images``."""
        inputs = _Inputs.of(as_samples(images))
        chosen = sample_images(len(inputs), self.config.bank.radius_images, self.config.bank.seed)
        with FeatureSpool(FEATURE_DIM, SPOOL_MEMORY_BYTES) as spool:
            n_read = sum(step.images_used for _, step in self._spool_sample(inputs, chosen, spool))
            return self._radius_stats(spool, n_read)

    def _new_bank(self, radius: float) -> ClusterBank:
        bank = self.config.bank
        device = resolve_device(self.config.device)
        return ClusterBank(FEATURE_DIM, radius, device=device, max_centroids=bank.max_centroids, **bank.search_options)

    def start_bank(self, sample: FeatureSpool | None = None, n_images: int = 0) -> ClusterBank:
        """Start a fresh bank (``bank_``, ``radius_stats_``) and return it.

        With ``radius: auto``, ``sample`` holds the patch features of the radius sample
        (``n_images`` images): the radius rule runs on them, then they stream in first.
        With a numeric radius no sample is needed.
        """
        if self.config.bank.radius == "auto":
            if sample is None or not n_images:
                msg = f"radius 'auto' needs the radius sample's features, got {n_images} image(s). Stream images first."
                raise DataError(msg)
            self.radius_stats_ = self._radius_stats(sample, n_images)
            self.bank_ = self._new_bank(self.radius_stats_.suggested)
            for rows in sample.iter_chunks():
                self.bank_.add(rows)
        else:
            radius = float(self.config.bank.radius)
            self.radius_stats_ = RadiusStats(radius)
            self.bank_ = self._new_bank(radius)
        return self.bank_

    def fit_steps(self, images: Any, start: int = 0) -> Iterator[FitStep]:
        """Stream training images into the bank, yielding after each loader batch.

        ``start`` > 0 continues a loaded checkpoint (its bank and radius) from that
        position of :meth:`training_order`; ``start`` = 0 resets the fitted state first.
        A fit that fails leaves no half-built state behind.
        """
        try:
            yield from self._fit_steps(images, start)
        except BaseException:
            self._reset()
            raise

    def _fit_steps(self, images: Any, start: int) -> Iterator[FitStep]:
        inputs = _Inputs.of(images)
        if not len(inputs):
            msg = "fit() got no images. Pass at least one normal training image."
            raise DataError(msg)
        n = len(inputs)
        order = self.training_order(n)
        n_sample = self.n_radius_images(n)
        began = time.perf_counter()
        so_far = FitProgress()

        def now() -> FitProgress:
            return replace(so_far, seconds=time.perf_counter() - began)

        if start == 0:
            self._reset()
            if n_sample:
                # One pass: the radius sample's features are spooled (spilling to disk past
                # SPOOL_MEMORY_BYTES), r is estimated on them, then they enter the bank first.
                with FeatureSpool(FEATURE_DIM, SPOOL_MEMORY_BYTES) as spool:
                    for end, step in self._spool_sample(inputs, order[:n_sample], spool):
                        so_far = replace(so_far, skipped_files=so_far.skipped_files + step.skipped_files)
                        yield FitStep("radius", end, n, now())
                    self.start_bank(spool, n_sample - so_far.images_skipped)
                so_far = replace(so_far, images_used=n_sample - so_far.images_skipped)
            else:
                self.start_bank()
            start = n_sample
            yield FitStep("bank", start, n, now())
        else:
            self._check_fitted(context=f" (fit_steps(start={start}) continues a checkpoint)")
        for end, step in self._extract_into(inputs, order[start:], self.bank_.add):
            so_far += step
            yield FitStep("bank", start + end, n, now())
        if self.bank_.n_seen == 0:
            msg = f"none of the {n} training images could be read. Check the files."
            raise DataError(msg)
        self.fit_summary_ = now()

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
        inputs = _Inputs.of(images)
        began = time.perf_counter()
        added = sum((step for _, step in self._extract_into(inputs, list(range(len(inputs))), bank.add)), FitProgress())
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
        """Set OK/NG thresholds from normal images the bank never saw; return self.

        The image threshold is the empirical (1 - false_alarm_rate) quantile of their
        scores (the conservative order statistic: with n images, the ceil((1 - a)(n + 1))-th
        smallest, capped at the largest); the pixel threshold is the same quantile of
        the per-image maxima of their maps, so that about the same share of normal
        images shows any NG pixel.
        """
        pred = self.predict(normal_images)
        ok = np.isfinite(pred.scores)
        if not ok.any():
            msg = "none of the calibration images could be read. Pass normal images of this product."
            raise DataError(msg)
        rate = self.config.decision.false_alarm_rate
        image_t = conservative_quantile(pred.scores[ok], rate)
        pixel_t = conservative_quantile(pred.maps[ok].reshape(int(ok.sum()), -1).max(axis=1), rate)
        n = int(ok.sum())
        if not (image_t > 0 and pixel_t > 0):
            # Exact distances: an image whose every patch is a centroid of the bank scores 0.
            msg = (
                f"the calibration images score at most {float(pred.scores[ok].max()):.4g}, so no threshold above 0 "
                "can be set: the bank holds their patches (they are its training images). "
                "Calibrate on normal images the bank never saw."
            )
            raise DataError(msg)
        self.decision_ = Decision(float(image_t), float(pixel_t), rate, n, source, attainable_false_alarm_rate=1 / (n + 1))
        if not self.decision_.target_met:
            log.warning(
                "calibrated on %d normal image(s): the threshold is their largest score, which certifies a "
                "false-alarm rate of 1/(n+1) = %.1f%%, not the %.1f%% asked for. Give at least %d normal images "
                "(--calibration DIR or a larger decision.holdout) for that target.",
                n, 100 / (n + 1), 100 * rate, int(np.ceil(1 / rate)) - 1,
            )
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

    def clone(self) -> Detector:
        """A copy sharing this Detector's backbone, with its own bank (the same state), record and fit summary."""
        copy = Detector.from_config(self.config, extractor=self.extractor)
        copy.restore(self.bank.state(), self.record())
        if "fit_summary_" in self.__dict__:
            copy.fit_summary_ = self.fit_summary_
        return copy

    def use_bank(self, bank: ClusterBank, radius_stats: RadiusStats) -> None:
        """Take a bank built elsewhere (a sharded build's merge) and how its radius was chosen."""
        self._reset()
        self.bank_ = bank
        self.radius_stats_ = radius_stats

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
