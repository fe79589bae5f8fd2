"""What a bank file says, typed, and the one way to open one.

A bank file (:mod:`ocbank.engine.checkpoint`) holds the bank's arrays and a JSON
metadata block. :class:`BankRecord` is that block as types: the detector config, the
calibrated thresholds, how the radius was chosen, the update lineage, the build's
identity and the stale-threshold flag. Keys this version does not know travel on
unchanged, so loading and saving a bank keeps every key the file had.

:func:`open_bank` reads a file once and runs every check a bank must pass before it
scores: format and checksum, the unfinished-checkpoint rule, the config, the feature
dimension and grid, and the weights file's hash. This module is the only reader of
raw metadata keys.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import Config, from_dict
from ..engine.checkpoint import BankState, is_checkpoint_name, read_bank
from ..errors import CheckpointError, ConfigError, DataError
from .calibration import Decision
from .features import FEATURE_DIM, FEATURE_STRIDE, file_sha256
from .progress import FitProgress
from .radius import RadiusStats

log = logging.getLogger(__name__)

# Keys a Detector writes from its live state on every save (what the bank is now), never carried over.
DESCRIBED_KEYS = ("backbone", "feature_grid", "image_size", "radius", "search_backend")
_KEY_OF = {"class_name": "class"}  # BuildIdentity field -> metadata key, where they differ


@dataclass(frozen=True)
class BuildIdentity:
    """How a bank was built: its class, config and training list, and how far the build got.

    ``ocbank build`` writes it; ``build --resume`` recognises its own files by it; an
    update carries it on. Every field is None in a bank saved outside a build.
    """

    class_name: str | None = None  # metadata key "class"
    dataset: Mapping[str, Any] | None = None  # {"format", "root"} of the build's config
    config_key: str | None = None  # hash of the build's config
    input_key: str | None = None  # hash of the ordered training (and calibration) list
    n_images: int | None = None  # training images in the list
    stream_position: int | None = None  # images streamed so far, in the detector's training order
    complete: bool | None = None  # False: an unfinished build checkpoint
    progress: FitProgress | None = None  # what streaming has done, across resumes
    summary: Mapping[str, Any] | None = None  # the build's summary row

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(_KEY_OF.get(f.name, f.name) for f in fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The metadata keys of the fields that are set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[_KEY_OF.get(f.name, f.name)] = value.to_dict() if isinstance(value, FitProgress) else value
        return out

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> BuildIdentity:
        values = {f.name: meta.get(_KEY_OF.get(f.name, f.name)) for f in fields(cls)}
        if isinstance(values["progress"], Mapping):
            values["progress"] = FitProgress.from_dict(values["progress"])
        return cls(**values)


@dataclass(frozen=True)
class BankRecord:
    """A bank file's metadata as types (everything beside the bank's arrays).

    :meth:`from_metadata` and :meth:`to_metadata` are inverse on every key but
    :data:`DESCRIBED_KEYS`, which a save writes from the live detector.
    """

    config: Config
    decision: Decision | None = None  # calibrated OK/NG thresholds
    radius_stats: RadiusStats | None = None  # how the radius was chosen
    lineage: tuple[Mapping[str, Any], ...] = ()  # one entry per ocbank update, oldest first
    build: BuildIdentity = field(default_factory=BuildIdentity)
    # True: the thresholds were calibrated before the last update (labels may be off);
    # None: the file does not say (never updated).
    thresholds_predate_update: bool | None = None
    other: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], where: str, device: str | None = None) -> BankRecord:
        """Parse and check a metadata dict; ``device`` overrides the stored one.

        Raises DataError (no config) or ConfigError (an unusable config or decision) naming ``where``.
        """
        if "config" not in meta:
            msg = f"{where}: this bank file has no detector config in its metadata. Build it with ocbank or Detector.save."
            raise DataError(msg)
        raw = dict(meta["config"])
        if device is not None:
            raw["device"] = device
        try:
            config = from_dict(raw, source=where, require_root=False)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, (ConfigError, DataError)):
                raise
            msg = f"{where}: its config is not usable: {exc}. Rebuild the bank."
            raise ConfigError(msg) from None
        block = meta.get("decision")
        try:
            decision = None if block is None else Decision.from_dict(block)
        except ConfigError as exc:
            msg = f"{where}: {exc}"
            raise ConfigError(msg) from None
        stale = meta.get("thresholds_predate_update")
        known = {"config", "decision", "radius_stats", "lineage", "thresholds_predate_update", *BuildIdentity.keys(),
                 *DESCRIBED_KEYS}
        return cls(
            config=config,
            decision=decision,
            radius_stats=RadiusStats.from_dict(meta.get("radius_stats")),
            lineage=tuple(meta.get("lineage") or ()),
            build=BuildIdentity.from_dict(meta),
            thresholds_predate_update=None if stale is None else bool(stale),
            other={k: v for k, v in meta.items() if k not in known},
        )

    def to_metadata(self) -> dict[str, Any]:
        """JSON-ready metadata (without :data:`DESCRIBED_KEYS`)."""
        meta: dict[str, Any] = {
            **self.other,
            **self.build.to_dict(),
            "config": self.config.to_dict(),
            "radius_stats": self.radius_stats.to_dict() if self.radius_stats is not None else {},
        }
        if self.decision is not None:
            meta["decision"] = self.decision.to_dict()
        if self.lineage:
            meta["lineage"] = [dict(entry) for entry in self.lineage]
        if self.thresholds_predate_update is not None:
            meta["thresholds_predate_update"] = self.thresholds_predate_update
        return meta

    @property
    def last_update(self) -> Mapping[str, Any]:
        """The newest lineage entry (what the last ``ocbank update`` did); empty when never updated."""
        return self.lineage[-1] if self.lineage else {}

    def unfinished(self, path: str | os.PathLike[str]) -> bool:
        """The one unfinished-checkpoint rule: named ``*.partial.h5``, or ``complete`` false in the file."""
        return self.build.complete is False or is_checkpoint_name(path)


@dataclass(frozen=True)
class OpenedBank:
    """A bank file read once and checked: its arrays and its record."""

    path: str
    state: BankState
    record: BankRecord
    unfinished: bool = False  # an unfinished build checkpoint, opened with allow_partial


@functools.lru_cache(maxsize=16)
def _weights_sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # the cache key: a rewritten file is hashed again
    return file_sha256(Path(path))


def _check_weights(record: BankRecord, backbone: Any, where: str) -> None:
    """A weights file must be the one the bank was built with (its sha256 is in the bank's backbone block)."""
    sha = backbone.get("weights_sha256") if isinstance(backbone, Mapping) else None
    weights = Path(record.config.backbone.weights)
    if sha is None or not weights.is_file():
        return
    stat = weights.stat()
    if _weights_sha256(str(weights.resolve()), stat.st_size, stat.st_mtime_ns) != sha:
        msg = f"{weights} differs from the weights {where} was built with (sha256 {sha[:12]}...). Rebuild the bank."
        raise DataError(msg)


def _check_features(state: BankState, record: BankRecord, grid: Any, where: str) -> None:
    """The bank's dimension and feature grid must be what the backbone gives at the config's image size."""
    if state.dim != FEATURE_DIM:
        msg = f"{where}: the bank holds {state.dim}-d centroids, but the backbone gives {FEATURE_DIM}-d patches. Rebuild it."
        raise DataError(msg)
    size = record.config.image_size
    if size % FEATURE_STRIDE or (grid is not None and list(grid) != [size // FEATURE_STRIDE] * 2):
        msg = f"{where}: image size {size} and feature grid {grid} disagree (stride {FEATURE_STRIDE}). Rebuild it."
        raise DataError(msg)


def open_bank(
    path: str | os.PathLike[str], *, allow_partial: bool = False, device: str | None = None, where: str | None = None
) -> OpenedBank:
    """Read a bank file once and check it: format and checksum (CheckpointError), an unfinished
    build checkpoint (CheckpointError unless ``allow_partial``), its config, dimension and feature
    grid (ConfigError / DataError) and its weights file (DataError).

    ``device`` overrides the stored one; ``where`` names the file in messages (default: ``path``).
    """
    where = where or str(path)
    try:
        state = read_bank(path)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(str(path), where)) from None
    meta = state.metadata
    record = BankRecord.from_metadata(meta, where, device)
    unfinished = record.unfinished(where)
    if unfinished and not allow_partial:
        build = record.build
        seen = f"{'?' if build.stream_position is None else build.stream_position} of " \
               f"{'?' if build.n_images is None else build.n_images}"
        msg = (
            f"{where} is an unfinished build checkpoint (complete: false; images streamed: {seen}). "
            "Finish it with ocbank build --resume, or pass --allow-partial to score with it anyway."
        )
        raise CheckpointError(msg)
    _check_features(state, record, meta.get("feature_grid"), where)
    _check_weights(record, meta.get("backbone"), where)
    if record.decision is not None and record.thresholds_predate_update:  # every consumer opens here
        log.warning(
            "%s: its OK/NG thresholds were calibrated before its last update (thresholds_predate_update), "
            "so labels and masks may be off. Recalibrate: ocbank update ... --calibration DIR of normal images.",
            where,
        )
    return OpenedBank(where, state, record, unfinished)


def read_record(path: str | os.PathLike[str], *, where: str | None = None) -> BankRecord:
    """The record of a bank file that is listed or copied, not scored.

    The file is read and checked as :func:`open_bank` does (format and checksum:
    CheckpointError; its config: DataError / ConfigError), but none of the scoring
    checks run: an unfinished checkpoint is read too, and the weights are not hashed.
    """
    where = where or str(path)
    try:
        state = read_bank(path)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace(str(path), where)) from None
    return BankRecord.from_metadata(state.metadata, where)


__all__ = ["DESCRIBED_KEYS", "BankRecord", "BuildIdentity", "OpenedBank", "open_bank", "read_record"]
