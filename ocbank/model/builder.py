"""Fitting as one state machine: the radius sample, the radius rule, then the bank.

    builder = BankBuilder(config, n_images=len(train))
    for i in builder.order: ...                      # the seeded radius sample first, then the rest
        builder.feed(features)                       # [B, h, w, 1536] (or [B, P, 1536]) per loader batch
    fitted = builder.finish()                        # FittedBank(bank, radius_stats)

With ``bank.radius: auto`` the first :attr:`BankBuilder.n_sample` images fed are the radius
sample (:func:`radius_sample`: seeded, the one rule for every way of fitting). Their patch
features are spooled (spilling to disk past :data:`SPOOL_MEMORY_BYTES`); when the last of
them has been fed, r is estimated on them (:func:`~ocbank.model.radius.estimate_radius`)
and they enter a new bank first, so no image is read twice. With a numeric radius the bank
opens at once. :meth:`Detector.fit <ocbank.model.detector.Detector.fit>`, ``partial_fit``,
the build job (sharded or not) and the anomalib adapter all fit through this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..engine import ClusterBank, resolve_device
from ..errors import DataError, InputError
from .features import FEATURE_DIM
from .radius import RadiusStats, estimate_radius, sample_images
from .spool import FeatureSpool

# Radius-sample features held in memory before the spool spills to a memory-mapped file.
SPOOL_MEMORY_BYTES = 2 << 30


def radius_sample(n_images: int, config: Config) -> list[int]:
    """The positions (sorted) of the radius sample among ``n_images`` training images: a seeded
    choice of ``bank.radius_images`` of them with ``radius: auto``, none with a numeric radius."""
    bank = config.bank
    return sample_images(n_images, bank.radius_images, bank.seed) if bank.radius == "auto" else []


def training_order(n_images: int, config: Config) -> list[int]:
    """The order images stream into the bank: the :func:`radius_sample` first, then the rest in order."""
    first = radius_sample(n_images, config)
    chosen = set(first)
    return first + [i for i in range(n_images) if i not in chosen]


def radius_stats(features: Any, n_images: int, config: Config) -> RadiusStats:
    """The radius rule on the sample's features [n, 1536] (an array or a spool) from ``n_images`` images."""
    estimate = estimate_radius(features, seed=config.bank.seed, search=config.bank.cpu_search)
    if not estimate.radius > 0:
        msg = f"the radius rule gave {estimate.radius} (identical patches?). Set bank.radius explicitly."
        raise DataError(msg)
    return RadiusStats(estimate.radius, estimate, n_images)


def new_bank(config: Config, radius: float) -> ClusterBank:
    """An empty bank of ``radius`` with the config's cap, device and search options."""
    bank = config.bank
    device = resolve_device(config.device)
    return ClusterBank(FEATURE_DIM, radius, device=device, max_centroids=bank.max_centroids, **bank.search_options)


@dataclass(frozen=True)
class FittedBank:
    """What fitting produces: the bank and how its radius was chosen."""

    bank: ClusterBank
    radius_stats: RadiusStats | None  # None: a bank file from before radius rules were recorded


class BankBuilder:
    """Patch features in, image by image: the radius sample, then the bank (see the module docstring).

    Parameters
    ----------
    config
        The run's configuration (``bank`` and ``device`` are used).
    n_images
        Images this fit will feed (it sizes the seeded radius sample). A builder that continues
        a bank (:meth:`continuing`) takes any number.
    """

    def __init__(self, config: Config, n_images: int) -> None:
        if not (isinstance(n_images, int) and n_images >= 0):
            msg = f"n_images must be a count of training images, got {n_images!r}. Pass len(images)."
            raise InputError(msg)
        self.config = config
        self.sample = radius_sample(n_images, config)
        self.order = training_order(n_images, config)
        self._spool: FeatureSpool | None = None
        self._sample_read = 0  # radius-sample images fed that could be read
        self._sample_fed = 0  # ... read or not
        self.images_fed = 0  # every image fed, read or not
        self._stats = None if config.bank.radius == "auto" else RadiusStats(float(config.bank.radius))
        self._bank: ClusterBank | None = None

    @classmethod
    def continuing(cls, config: Config, fitted: FittedBank) -> BankBuilder:
        """A builder that streams on into ``fitted``'s bank (a resumed build, ``partial_fit``)."""
        builder = cls(config, 0)
        builder._stats, builder._bank = fitted.radius_stats, fitted.bank
        return builder

    @property
    def n_sample(self) -> int:
        """Images in the radius sample (the first ones fed); 0 with a numeric radius."""
        return len(self.sample)

    @property
    def phase(self) -> str:
        """"radius" while the radius sample is being fed, then "bank"."""
        return "radius" if self._stats is None and self._bank is None else "bank"

    @property
    def radius_stats(self) -> RadiusStats | None:
        """How the radius was chosen: known once the radius sample is in (None before)."""
        return self._stats

    @property
    def bank(self) -> ClusterBank | None:
        """The bank, opened on first use once the radius is known, with the radius sample streamed
        in first (None while the sample is still being fed)."""
        if self._bank is None and self._stats is not None:
            bank = new_bank(self.config, self._stats.suggested)
            spool, self._spool = self._spool, None
            if spool is not None:
                with spool:
                    for rows in spool.iter_chunks():
                        bank.add(rows)
            self._bank = bank
        return self._bank

    def feed(self, features: torch.Tensor | np.ndarray, n_unreadable: int = 0) -> None:
        """Stream one batch: ``features`` [B, h, w, 1536] or [B, P, 1536] for its B readable images,
        in feeding order, and ``n_unreadable`` images of the batch that could not be read (within
        the radius sample they count toward its size; a batch with unreadable images must then not
        cross the sample's end)."""
        per_image = torch.as_tensor(features)
        if per_image.ndim < 2 or per_image.shape[-1] != FEATURE_DIM:
            msg = f"features must be [B, ..., {FEATURE_DIM}] per image, got shape {tuple(per_image.shape)}. Pass the extractor's output."
            raise InputError(msg)
        n = per_image.shape[0]
        self.images_fed += n + n_unreadable
        if self.phase == "radius":
            room = self.n_sample - self._sample_fed
            if n_unreadable and n + n_unreadable > room:
                # Which images of the batch were unreadable is not known here: one that crosses the
                # sample's end could put the wrong images in the sample.
                msg = (
                    f"a batch with {n_unreadable} unreadable image(s) crosses the radius sample's end "
                    f"({room} image(s) of the sample left, the batch has {n + n_unreadable}). Feed the sample in batches of its own."
                )
                raise InputError(msg)
            head = min(n, room)
            if head:
                self._spool_rows(per_image[:head])
            self._sample_read += head
            self._sample_fed += head + min(n_unreadable, room - head)
            if self._sample_fed < self.n_sample:
                return
            self._close_sample()
            per_image, n = per_image[room:], max(0, n - room)
        if n:
            self.bank.add(per_image.reshape(-1, FEATURE_DIM).cpu().numpy())

    def _spool_rows(self, per_image: torch.Tensor) -> None:
        if self._spool is None:
            self._spool = FeatureSpool(FEATURE_DIM, SPOOL_MEMORY_BYTES)
        self._spool.append(per_image.reshape(-1, FEATURE_DIM).cpu().numpy())

    def _close_sample(self) -> None:
        """The radius rule on the spooled sample (the spool waits for :attr:`bank`)."""
        if self._spool is None:
            msg = f"none of the {self._sample_fed} radius-sample images could be read. Check the training images."
            raise DataError(msg)
        self._stats = radius_stats(self._spool, self._sample_read, self.config)

    def finish(self) -> FittedBank:
        """The fitted bank. A radius sample still open (fewer images came than the builder was
        sized for) is closed here; DataError when no image could be read at all."""
        if self.phase == "radius":
            self._close_sample()
        bank = self.bank
        assert bank is not None
        if bank.n_seen == 0:
            msg = f"none of the {self.images_fed} training images could be read. Check the files."
            raise DataError(msg)
        return FittedBank(bank, self._stats)

    def close(self) -> None:
        """Release the radius sample's spool (a fit given up, or only its radius wanted); idempotent."""
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()

    def __enter__(self) -> BankBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
