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

from ..data import Sample, SharedImage, calibration_images, escape_path, list_inputs, shared_images
from ..errors import BankChangedError, DataError
from ..model.detector import Detector
from ..model.features import file_sha256
from ..model.progress import progress_bar
from .build import training_images, warn_calibration_in_bank
from .lock import build_lock


@dataclass(frozen=True)
class UpdateJob:
    bank: str  # the parent bank file
    inputs: tuple[str, ...]  # new normal images: files or folders
    out: str  # the new bank file (may equal bank: replaced atomically)
    calibration: str | None = None  # folder of normal images to recalibrate the thresholds on
    device: str | None = None
    progress: bool = False  # progress bars on stderr for the new images and the calibration


# The bank's identity that an update carries over, so that ``build --resume`` recognises
# the file as its own training list, extended (the lineage says by what).
_IDENTITY_KEYS = ("class", "dataset", "config_key", "input_key", "n_images", "stream_position", "complete", "progress")


def update_bank(job: UpdateJob) -> dict[str, Any]:
    """Stream ``job.inputs`` into the bank, recalibrate if asked, write ``job.out``; return a summary.

    Holds the build lock of ``job.out``'s folder for the whole run, so an update never
    races a build or another update writing there; and refuses to write when the parent
    file changed while it ran (another writer), naming both SHA-256 digests.
    """
    began = time.perf_counter()
    files = list_inputs(list(job.inputs))
    calibration = calibration_images(job.calibration) if job.calibration else None
    with build_lock(Path(job.out).parent):
        parent = file_sha256(Path(job.bank)) if Path(job.bank).is_file() else "none (no file)"  # its bytes
        det = Detector.load(job.bank, device=job.device)  # a missing or damaged file is refused by name here
        if det.metadata_.get("complete") is False:
            msg = f"{job.bank} is a partial checkpoint, not a finished bank. Finish the build with --resume first."
            raise DataError(msg)
        k_before, seen_before = len(det.bank), det.bank.n_seen
        with progress_bar("update", len(files), job.progress):
            det.partial_fit([Sample(str(f)) for f in files])
        added = det.last_partial_fit_
        if added.images_used == 0:
            msg = f"none of the {len(files)} new images could be read; {job.bank} was not changed."
            raise DataError(msg)
        before = _thresholds(det)
        shared: list[SharedImage] = []
        if calibration is not None:
            shared = calibration_in_bank(det, calibration, files)
            warn_calibration_in_bank(shared, len(calibration), str(job.bank))
            with progress_bar("calibration", len(calibration), job.progress):
                det.calibrate(calibration, source="folder")
        stale = det.decision is not None and calibration is None
        entry = {
            "parent_sha256": parent,
            "parent_file": escape_path(job.bank),
            "images_added": added.images_used,
            "images_skipped": added.images_skipped,
            "vectors_added": det.bank.n_seen - seen_before,
            "recalibrated": calibration is not None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        det.lineage_ = [*det.__dict__.get("lineage_", []), entry]
        keep = {k: v for k, v in det.metadata_.items() if k in _IDENTITY_KEYS}
        if "summary" in det.metadata_:  # the build's row, brought up to date
            keep["summary"] = {**det.metadata_["summary"], "n_centroids": len(det.bank), "bank_bytes": det.bank.nbytes,
                               "updates": len(det.lineage_)}
        _check_unchanged(job.bank, parent, "while this update ran")  # last look, under the lock
        det.save(job.out, extra={**keep, "thresholds_predate_update": stale})
    return {
        **entry,
        "n_centroids_before": k_before,
        "n_centroids": len(det.bank),
        "thresholds_predate_update": stale,
        "thresholds_before": before,
        "thresholds": _thresholds(det),
        "calibration_in_bank": [str(x) for x in shared],
        "seconds": time.perf_counter() - began,
    }


def _thresholds(det: Detector) -> dict[str, float] | None:
    """The bank's OK/NG thresholds (image, pixel), or None when it has none."""
    d = det.decision
    return None if d is None else {"image": d.image_threshold, "pixel": d.pixel_threshold}


def calibration_in_bank(det: Detector, calibration: list[Sample], new_files: list[Path]) -> list[SharedImage]:
    """The calibration images the bank holds: in the build's training list (:func:`training_images`,
    when its dataset is still there) or among this update's new images; by resolved path or content."""
    trained = training_images(det) or []
    return shared_images(calibration, [*trained, *(Sample(str(f)) for f in new_files)])


def _check_unchanged(bank: str, sha: str, when: str) -> None:
    """Refuse to go on when ``bank`` no longer has the bytes this update started from."""
    try:
        now = file_sha256(Path(bank))
    except FileNotFoundError:
        now = "none (the file is gone)"
    if now != sha:
        msg = (
            f"{bank} changed {when}: its SHA-256 was {sha} and is now {now}, so another process wrote it. "
            "Nothing was written; run the update again on the new bank."
        )
        raise BankChangedError(msg)
