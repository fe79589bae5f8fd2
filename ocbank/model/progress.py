"""What streaming images into a bank has done: one record family for fit steps, fit summaries,
partial fits, a build's progress across resumes and a shard's result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
    done: FitProgress  # this call so far: images streamed into the bank, unreadable files, seconds

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "position": self.position, "n_images": self.n_images, **self.done.to_dict()}
