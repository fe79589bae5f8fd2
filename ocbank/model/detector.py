"""Detector: the feature extractor and the bank behind one object, for pipelines."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import config as config_mod
from ..data import Sample, make_loader
from ..engine import ClusterBank, resolve_device
from ..engine.checkpoint import read_bank
from ..errors import DataError
from .features import FEATURE_DIM, FEATURE_STRIDE, FeatureExtractor
from .radius import radius_statistics, sample_images
from .scoring import anomaly_maps, image_scores

ImageLike = Any  # a path, a PIL image, or a uint8 array [H, W(, 3)]


@dataclass
class ScoredBatch:
    """Results for the readable images of one loader batch."""

    indices: list[int]  # positions in the input sequence
    skipped: list[int]
    scores: np.ndarray  # [B]
    maps: np.ndarray  # [B, S, S]
    rgb: np.ndarray  # [B, S, S, 3] uint8, the cropped input
    masks: np.ndarray | None  # [B, S, S] uint8


def _as_samples(images: Iterable[ImageLike] | Sequence[Sample]) -> list[Sample]:
    return [im if isinstance(im, Sample) else Sample(im) for im in images]


class Detector:
    """WideResNet-50 patch features streamed into a :class:`ClusterBank`.

    ``Detector(config).fit(images)`` builds the bank; ``predict(images)`` returns
    image scores [n] and anomaly maps [n, S, S] (S = crop size). ``save`` writes
    one HDF5 file holding the bank and what is needed to rebuild the extractor.
    ``predict`` may be called from several threads at once.
    """

    def __init__(
        self,
        config: config_mod.Config | dict[str, Any] | str | os.PathLike[str] | None = None,
        progress: bool = False,
        extractor: FeatureExtractor | None = None,
    ) -> None:
        if config is None:
            config = {}
        if isinstance(config, dict):
            config = config_mod.from_dict(config, require_root=False)
        elif not isinstance(config, config_mod.Config):
            config = config_mod.load(config, require_root=False)
        self.config = config
        self.progress = progress
        self._extractor = extractor
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ parts
    @property
    def extractor(self) -> FeatureExtractor:
        with self._lock:
            if self._extractor is None:
                bb = self.config.backbone
                self._extractor = FeatureExtractor(
                    weights=bb["weights"],
                    pool=bb["pool"],
                    device=resolve_device(self.config.device),
                    autocast=bb["autocast"],
                )
            return self._extractor

    @property
    def bank(self) -> ClusterBank:
        bank = self.__dict__.get("bank_")
        if bank is None:
            msg = "this Detector has no bank yet: call fit(images) or Detector.load(path) first."
            raise RuntimeError(msg)
        return bank

    def _batches(self, samples: Sequence[Sample], desc: str, with_masks: bool = False) -> Iterator[dict[str, Any]]:
        loader = make_loader(samples, self.config, with_masks=with_masks)
        yield from tqdm(loader, desc=desc, unit="batch", disable=not self.progress, leave=False)

    def features(
        self, images: Iterable[ImageLike] | Sequence[Sample], desc: str = "features", with_masks: bool = False
    ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """Yield (loader batch, features [B, h, w, 1536]) for each batch with readable images.

        The batch dict holds ``index`` (input positions), ``skipped``, ``rgb`` and,
        with ``with_masks``, ``mask``. Batches whose images were all unreadable
        are yielded with an empty feature tensor.
        """
        for batch in self._batches(_as_samples(images), desc, with_masks):
            if not batch["index"]:
                yield batch, torch.zeros((0, 0, 0, FEATURE_DIM))
                continue
            yield batch, self.extractor(batch["image"])

    # ------------------------------------------------------------------ build
    def choose_radius(self, samples: Sequence[Sample]) -> tuple[float, dict[str, float]]:
        """The configured radius, or the p99 rule on up to ``bank.radius_images`` images."""
        radius = self.config.bank["radius"]
        if radius != "auto":
            return float(radius), {"suggested": float(radius), "source": "config"}
        chosen = sample_images(len(samples), int(self.config.bank["radius_images"]), int(self.config.bank["seed"]))
        feats = [
            feats.reshape(-1, FEATURE_DIM).cpu().numpy()
            for _, feats in self.features([samples[i] for i in chosen], "radius")
        ]
        if not feats:
            msg = "no readable image to estimate the radius from. Check the training images."
            raise DataError(msg)
        stats = radius_statistics(np.concatenate(feats))
        if not stats["suggested"] > 0:
            msg = f"the radius rule gave {stats['suggested']} (identical patches?). Set bank.radius explicitly."
            raise DataError(msg)
        stats["n_images"] = len(chosen)
        return stats["suggested"], stats

    def fit(
        self,
        images: Iterable[ImageLike] | Sequence[Sample],
        bank: ClusterBank | None = None,
        start: int = 0,
        on_batch: Callable[[Detector, int, int, list[str]], None] | None = None,
    ) -> Detector:
        """Stream the training images' patch features into a bank; return self.

        ``bank`` continues an existing bank (its radius is kept) from image
        ``start`` on, which is how a checkpointed build resumes. ``on_batch`` is
        called after each loader batch with (self, images consumed so far,
        images used in this call, unreadable files in this call).
        """
        samples = _as_samples(images)
        if not samples:
            msg = "fit() got no images. Pass at least one normal training image."
            raise DataError(msg)
        began = time.perf_counter()
        if bank is None:
            radius, stats = self.choose_radius(samples)
            bank = ClusterBank(FEATURE_DIM, radius, device=resolve_device(self.config.device))
        else:
            stats = getattr(self, "radius_stats_", None) or {"suggested": bank.radius, "source": "given bank"}
        previous = {k: self.__dict__[k] for k in ("bank_", "radius_stats_") if k in self.__dict__}
        self.bank_ = bank  # on_batch may save the detector mid-stream
        self.radius_stats_ = stats
        skipped: list[str] = []
        used = 0
        try:
            for batch, feats in self.features(samples[start:], "build"):
                skipped += [str(samples[start + i].path) for i in batch["skipped"]]
                if batch["index"]:
                    bank.add(feats.reshape(-1, FEATURE_DIM))
                    used += len(batch["index"])
                if on_batch is not None:
                    position = start + max(batch["index"] + batch["skipped"]) + 1
                    on_batch(self, position, used, skipped)
            if used == 0 and bank.n_seen == 0:
                msg = f"none of the {len(samples)} training images could be read. Check the files."
                raise DataError(msg)
        except BaseException:
            for key in ("bank_", "radius_stats_"):
                self.__dict__.pop(key, None)
            self.__dict__.update(previous)
            raise
        self.fit_summary_ = {
            "images_used": used,
            "images_skipped": len(skipped),
            "skipped_files": skipped,
            "seconds": time.perf_counter() - began,
        }
        return self

    # ------------------------------------------------------------------ score
    def score_batches(self, images: Iterable[ImageLike] | Sequence[Sample], with_masks: bool = False) -> Iterator[ScoredBatch]:
        """Stream results batch by batch (keeps memory flat on large test sets)."""
        bank = self.bank
        sigma = float(self.config.raw["scoring"]["sigma"])
        size = self.config.image_size
        for batch, feats in self.features(images, "score", with_masks=with_masks):
            if not batch["index"]:
                empty_maps = np.zeros((0, size, size), np.float32)
                yield ScoredBatch([], batch["skipped"], np.zeros(0), empty_maps, np.zeros((0, size, size, 3), np.uint8), None)
                continue
            b, h, w, _ = feats.shape
            dist, _ = bank.search(feats.reshape(-1, FEATURE_DIM), k=1)
            grid = dist.reshape(b, h, w)
            yield ScoredBatch(
                batch["index"],
                batch["skipped"],
                image_scores(grid),
                anomaly_maps(grid, size, sigma),
                batch["rgb"],
                batch.get("mask"),
            )

    def predict(self, images: Iterable[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (scores float32 [n], maps float32 [n, S, S]); NaN for unreadable images."""
        samples = _as_samples(images)
        size = self.config.image_size
        scores = np.full(len(samples), np.nan, dtype=np.float32)
        maps = np.full((len(samples), size, size), np.nan, dtype=np.float32)
        for res in self.score_batches(samples):
            scores[res.indices] = res.scores
            maps[res.indices] = res.maps
        return scores, maps

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        size = self.config.image_size
        return {
            "config": self.config.raw,
            "backbone": self.extractor.describe(),
            "feature_grid": [size // FEATURE_STRIDE, size // FEATURE_STRIDE],
            "image_size": size,
            "radius": self.bank.radius,
            "radius_stats": getattr(self, "radius_stats_", {}),
        }

    def save(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        """One HDF5 file: the bank plus config and backbone description in its metadata."""
        meta = self.metadata()
        meta.update(extra or {})
        self.bank.save(path, metadata=meta)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | None = None,
        progress: bool = False,
        extractor: FeatureExtractor | None = None,
    ) -> Detector:
        """Rebuild a Detector from a file written by :meth:`save` (or ``ocbank build``)."""
        state = read_bank(path)
        meta = state.metadata
        if "config" not in meta:
            msg = f"{path}: this bank file has no detector config in its metadata. Build it with ocbank or Detector.save."
            raise DataError(msg)
        raw = meta["config"]
        if device is not None:
            raw = {**raw, "device": device}
        det = cls(config_mod.from_dict(raw, source=str(path), require_root=False), progress, extractor)
        det.bank_ = ClusterBank.from_state(state, device=resolve_device(det.config.device))
        det.radius_stats_ = meta.get("radius_stats", {})
        det.metadata_ = meta
        sha = meta.get("backbone", {}).get("weights_sha256")
        if extractor is None and sha is not None:
            from .features import file_sha256  # noqa: PLC0415

            weights = Path(det.config.backbone["weights"])
            if weights.is_file() and file_sha256(weights) != sha:
                msg = f"{weights} differs from the weights this bank was built with (sha256 {sha[:12]}...). Rebuild the bank."
                raise DataError(msg)
        return det
