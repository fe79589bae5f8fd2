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

from ..data import Sample, calibration_images, escape_path, list_inputs
from ..errors import BankChangedError, DataError
from ..model.detector import Detector
from ..model.features import file_sha256
from ..model.record import open_bank
from .lock import build_lock


@dataclass(frozen=True)
class UpdateJob:
    bank: str  # the parent bank file
    inputs: tuple[str, ...]  # new normal images: files or folders
    out: str  # the new bank file (may equal bank: replaced atomically)
    calibration: str | None = None  # folder of normal images to recalibrate the thresholds on
    device: str | None = None


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
        # A missing, damaged or unfinished file is refused by name here.
        det = Detector.from_opened(open_bank(job.bank, device=job.device))
        k_before, seen_before = len(det.bank), det.bank.n_seen
        det.partial_fit([Sample(str(f)) for f in files])
        added = det.last_partial_fit_
        if added.images_used == 0:
            msg = f"none of the {len(files)} new images could be read; {job.bank} was not changed."
            raise DataError(msg)
        if calibration is not None:
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
        # The build's identity stays, so that ``build --resume`` recognises the file as its own
        # training list, extended (the lineage says by what).
        det.note_update(entry, thresholds_predate_update=stale)
        _check_unchanged(job.bank, parent, "while this update ran")  # last look, under the lock
        det.save(job.out)
    return {
        **entry,
        "n_centroids_before": k_before,
        "n_centroids": len(det.bank),
        "thresholds_predate_update": stale,
        "seconds": time.perf_counter() - began,
    }


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
