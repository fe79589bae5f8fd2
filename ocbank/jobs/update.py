"""Keep learning on the line: stream new normal images into an existing bank.

The bank is online by nature: new images enter at its radius exactly as if they had
followed the original training stream, so building on A and updating with B gives
the bank of one build on A followed by B. The new file records its lineage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import Sample, calibration_images, list_inputs
from ..errors import DataError
from ..model.detector import Detector
from ..model.features import file_sha256


@dataclass(frozen=True)
class UpdateJob:
    bank: str  # the parent bank file
    inputs: tuple[str, ...]  # new normal images: files or folders
    out: str  # the new bank file (may equal bank: replaced atomically)
    calibration: str | None = None  # folder of normal images to recalibrate the thresholds on
    device: str | None = None


def update_bank(job: UpdateJob) -> dict[str, Any]:
    """Stream ``job.inputs`` into the bank, recalibrate if asked, write ``job.out``; return a summary."""
    began = time.perf_counter()
    det = Detector.load(job.bank, device=job.device)
    if det.metadata_.get("complete") is False:
        msg = f"{job.bank} is a partial checkpoint, not a finished bank. Finish the build with --resume first."
        raise DataError(msg)
    parent = file_sha256(Path(job.bank))  # of the parent file's bytes
    k_before, seen_before = len(det.bank), det.bank.n_seen
    files = list_inputs(list(job.inputs))
    det.partial_fit([Sample(str(f)) for f in files])
    added = det.last_partial_fit_
    if added["images_added"] == 0:
        msg = f"none of the {len(files)} new images could be read; {job.bank} was not changed."
        raise DataError(msg)
    if job.calibration:
        det.calibrate(calibration_images(job.calibration), source="folder")
    stale = det.decision is not None and not job.calibration
    entry = {
        "parent_sha256": parent,
        "parent_file": str(job.bank),
        "images_added": added["images_added"],
        "images_skipped": added["images_skipped"],
        "vectors_added": det.bank.n_seen - seen_before,
        "recalibrated": bool(job.calibration),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    det.lineage_ = [*det.__dict__.get("lineage_", []), entry]
    keep = {k: v for k, v in det.metadata_.items() if k in ("class", "dataset", "config_key", "complete")}
    det.save(job.out, extra={**keep, "thresholds_predate_update": stale})
    return {
        **entry,
        "n_centroids_before": k_before,
        "n_centroids": len(det.bank),
        "thresholds_predate_update": stale,
        "seconds": time.perf_counter() - began,
    }
