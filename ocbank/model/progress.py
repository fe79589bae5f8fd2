"""What streaming images into a bank has done: one record family for fit steps, fit summaries,
partial fits, a build's progress across resumes and a shard's result; and the progress bar
every long step shows (:func:`progress_bar`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

# The bar that the images read in this context advance (None: no bar is open).
_OPEN_BAR: ContextVar[Any] = ContextVar("ocbank_progress_bar", default=None)


@contextlib.contextmanager
def progress_bar(desc: str, total: int | None, enabled: bool = True, initial: int = 0) -> Iterator[Any]:
    """A tqdm bar on stderr, counting images, that every image the detector reads advances.

    The one way a long step shows progress (build, update, calibration, the radius sample,
    evaluate, predict): the job opens the bar around the call, and each loader batch that
    :meth:`ocbank.model.detector.Detector.features` hands out while it is open advances it
    by the batch's images, read or unreadable. ``enabled=False`` (the CLI's ``-q``) shows
    nothing. Bars are per context (thread), so a server's concurrent requests never share one.
    """
    bar = tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not enabled, leave=False, file=sys.stderr)
    token = _OPEN_BAR.set(bar)
    try:
        yield bar
    finally:
        _OPEN_BAR.reset(token)
        bar.close()


def with_progress(steps: Iterable[T], desc: str, total: int | None, enabled: bool = True) -> Iterator[T]:
    """``steps`` (a generator that reads images, e.g. ``det.score_batches(...)``) with a
    :func:`progress_bar` open while it runs: ``for res in with_progress(det.score_batches(x), "predict", len(x))``."""
    with progress_bar(desc, total, enabled):
        yield from steps


def advance(n_images: int) -> None:
    """Count ``n_images`` more images on the open :func:`progress_bar`, if there is one."""
    bar = _OPEN_BAR.get()
    if bar is not None:
        bar.update(n_images)


@dataclass(frozen=True)
class FitProgress:
    """Images streamed into a bank, the files that could not be read, and the seconds it took.

    Records add up (``a + b``): a resumed build adds this run's to the checkpoint's, a
    partial fit adds to the fit's summary, a sharded build sums its shards.
    """

    images_used: int = 0
    skipped_files: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def images_skipped(self) -> int:
        return len(self.skipped_files)

    def __add__(self, other: FitProgress) -> FitProgress:
        return FitProgress(
            self.images_used + other.images_used, self.skipped_files + other.skipped_files, self.seconds + other.seconds
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: images_used, images_skipped, skipped_files, seconds."""
        return {
            "images_used": self.images_used,
            "images_skipped": self.images_skipped,
            "skipped_files": list(self.skipped_files),
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FitProgress:
        return cls(int(d.get("images_used", 0)), tuple(d.get("skipped_files", ())), float(d.get("seconds", 0.0)))


@dataclass(frozen=True)
class FitStep:
    """Progress of :meth:`ocbank.model.detector.Detector.fit_steps` after one loader batch."""

    phase: str  # "radius" (the radius sample is being read) or "bank" (images stream into the bank)
    position: int  # images consumed so far, in the detector's training order
    n_images: int  # images in the training list
    so_far: FitProgress  # this call so far: images streamed into the bank, unreadable files, seconds

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "position": self.position, "n_images": self.n_images, **self.so_far.to_dict()}
