"""Keep learning on the line: stream new normal images into an existing bank, gated and versioned.

The bank is online by nature: new images enter at its radius exactly as if they had
followed the original training stream, so building on A and updating with B gives
the bank of one build on A followed by B. The new file records its lineage.

Because a centroid is never forgotten, what enters is checked first:

- the gate: each new image is scored against the parent bank, and an image whose
  normalized score (score / NG threshold) is above the gate multiple is held back, never
  absorbed. The gate sits above the threshold so that an overruled false alarm (a normal
  image a little over it) is learnt while a clear defect is not;
- the growth guard: an update that would add more than ``max_new_centroids`` x K
  centroids (the wrong product's folder) is refused as a whole.

The addition is computed on a copy of the parent, so a refusal leaves the parent as it
was, in memory and on disk. Every update keeps its parent in ``<banks>/history/``
(:mod:`ocbank.jobs.versions`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Sample, SharedImage, calibration_images, escape_path, list_inputs, shared_images
from ..errors import BankChangedError, DataError, UpdateRefusedError
from ..jsonio import write_json
from ..model.calibration import Decision
from ..model.detector import Detector
from ..model.features import file_sha256
from ..model.progress import progress_bar
from ..model.record import open_bank
from . import AUTO_GATE_MULTIPLE, DEFAULT_KEEP_HISTORY, DEFAULT_MAX_NEW_CENTROIDS, GATE_AUTO, GATE_OFF, versions
from .build import training_images, warn_calibration_in_bank
from .lock import build_lock

REPORT_SUFFIX = ".update.json"


@dataclass(frozen=True)
class UpdateJob:
    """What :func:`update_bank` does: which bank, which new images, where to write, and its guards."""

    bank: str  # the parent bank file
    inputs: tuple[str, ...]  # new normal images: files or folders
    out: str  # the new bank file (may equal bank: replaced atomically, the parent kept in history/)
    calibration: str | None = None  # folder of normal images to recalibrate the thresholds on
    device: str | None = None
    gate: str | float = GATE_AUTO  # "auto", "off", or a multiple (>= 1) of the NG threshold
    max_new_centroids: float = DEFAULT_MAX_NEW_CENTROIDS  # refuse an update adding more than this x K centroids
    keep_history: int = DEFAULT_KEEP_HISTORY  # earlier versions kept in <out's folder>/history
    dry_run: bool = False  # score, gate and measure the growth; write nothing
    progress: bool = False  # progress bars on stderr for the new images and the calibration


@dataclass(frozen=True)
class ScoredImage:
    """A new image's score against the parent bank (``normalized`` = score / NG threshold)."""

    image: str  # its path, escaped (:func:`ocbank.data.escape_path`)
    score: float
    normalized: float


@dataclass(frozen=True)
class GateResult:
    """How the gate split an update's images."""

    multiple: float | None  # None: the gate is off
    threshold: float | None  # the raw score the gate sits at (multiple x NG threshold); None when off
    absorbed: list[str] = field(default_factory=list)  # image paths to stream in, in the order given
    held: list[ScoredImage] = field(default_factory=list)  # above the gate: never absorbed
    passed: list[ScoredImage] = field(default_factory=list)  # the scores of the absorbed images (empty when off)
    unreadable: list[str] = field(default_factory=list)  # escaped names of images that could not be scored


def gate_multiple(gate: str | float, decision: Decision | None, where: str) -> float | None:
    """The gate multiple ``gate`` asks for: None for "off", :data:`AUTO_GATE_MULTIPLE` for "auto", else the number.

    Raises UpdateRefusedError for a multiple < 1 or not finite, and when the bank has no
    thresholds to gate on (``decision`` None) and the gate is not off.
    """
    if gate == GATE_OFF:
        return None
    multiple = AUTO_GATE_MULTIPLE if gate == GATE_AUTO else gate
    if isinstance(multiple, str) or isinstance(multiple, bool) or not math.isfinite(multiple) or multiple < 1:
        msg = (f"the gate must be 'auto', 'off' or a multiple >= 1 of the NG threshold, got {gate!r}. "
               "The gate sits at or above the threshold, so that overruled false alarms are learnt.")
        raise UpdateRefusedError(msg)
    if decision is None:
        msg = (f"{where} is not calibrated, so it has no NG threshold to gate the update on. "
               "Pass --gate off to absorb every image, or calibrate it first (ocbank update --calibration DIR).")
        raise UpdateRefusedError(msg)
    return float(multiple)


def apply_gate(det: Detector, files: list[Path], multiple: float | None) -> GateResult:
    """Score ``files`` against ``det``'s bank (unchanged) and split them at ``multiple`` x its NG threshold.

    An image is held back when its normalized score is above ``multiple`` (strictly; the
    NG rule's strictness); with ``multiple`` None nothing is scored and every file passes.
    """
    if multiple is None:
        return GateResult(None, None, absorbed=[str(f) for f in files])
    decision = det.decision
    assert decision is not None  # gate_multiple refuses an uncalibrated bank
    samples = [Sample(str(f)) for f in files]
    scores = np.full(len(samples), np.nan, dtype=np.float64)
    for res in det.score_batches(samples):  # batch by batch: the maps are not kept
        scores[res.indices] = res.scores
    result = GateResult(multiple, multiple * decision.image_threshold)
    for path, score in zip(files, scores, strict=True):
        if not np.isfinite(score):
            result.unreadable.append(escape_path(path))
            continue
        scored = ScoredImage(escape_path(path), float(score), float(score / decision.image_threshold))
        if scored.normalized > multiple:
            result.held.append(scored)
        else:
            result.absorbed.append(str(path))
            result.passed.append(scored)
    return result


def grown_copy(det: Detector, images: list[str]) -> Detector:
    """A copy of ``det`` (sharing its backbone) with ``images`` streamed into its bank; ``det`` is not changed."""
    copy = det.clone()
    if images:
        copy.partial_fit([Sample(p) for p in images])
    return copy


def growth_refusal(k_before: int, k_after: int, max_new_centroids: float, where: str) -> str | None:
    """The one-line refusal when K grows by more than ``max_new_centroids`` x ``k_before``; None when within."""
    allowed = math.floor(max_new_centroids * k_before)
    added = k_after - k_before
    if added <= allowed:
        return None
    return (f"this update would add {added} centroids to {where} (K {k_before} -> {k_after}), more than "
            f"--max-new-centroids {max_new_centroids:g} x K = {allowed}: are these images of another product? "
            f"Nothing was written. If they belong to it, pass --max-new-centroids {math.ceil(100 * added / k_before) / 100:g}.")


def report_path(out: str | Path) -> Path:
    """The JSON report an update writes beside its bank: ``<out's folder>/<product>.update.json``."""
    out = Path(out)
    return out.with_name(out.stem + REPORT_SUFFIX)


def update_bank(job: UpdateJob) -> dict[str, Any]:
    """Gate ``job.inputs``, stream the passed ones into a copy of the bank, recalibrate if asked, write ``job.out``.

    Returns a summary (strict JSON): ``parent_sha256``, ``bank_sha256`` (of the file written; the
    parent's when nothing was written), ``images_added``, ``images_held``, ``images_skipped``,
    ``held_back`` / ``absorbed`` (``{"image", "score", "normalized"}``), ``unreadable``, ``gate``,
    ``n_centroids_before``, ``n_centroids``, ``new_centroids``, ``recalibrated``,
    ``thresholds_predate_update``, ``written``, ``dry_run``, ``refused`` (dry runs only: the growth
    guard's message, or None), ``history`` (the parent's kept copy), ``report``, ``seconds``.

    Holds the build lock of ``job.out``'s folder for the whole run (builds, updates and
    rollbacks of that folder wait their turn), and refuses to write when the parent file
    changed while it ran (another writer), naming both SHA-256 digests. Raises
    UpdateRefusedError (growth guard, no threshold to gate on: nothing written), DataError
    (no new image readable), BuildLockError, BankChangedError. When every image is held back
    and no recalibration was asked for, no new version is written (``written`` False) but the
    report is. A dry run writes nothing at all.
    """
    began = time.perf_counter()
    files = list_inputs(list(job.inputs))
    calibration = calibration_images(job.calibration) if job.calibration else None
    out = Path(job.out)
    with build_lock(out.parent):
        parent = file_sha256(Path(job.bank)) if Path(job.bank).is_file() else "none (no file)"  # its bytes
        # A missing, damaged or unfinished file is refused by name here.
        det = Detector.from_opened(open_bank(job.bank, device=job.device))
        multiple = gate_multiple(job.gate, det.decision, job.bank)
        with progress_bar("gate", len(files), job.progress and multiple is not None):
            gated = apply_gate(det, files, multiple)
        k_before, seen_before = len(det.bank), det.bank.n_seen
        with progress_bar("update", len(gated.absorbed), job.progress):
            new = grown_copy(det, gated.absorbed)
        added = getattr(new, "last_partial_fit_", None)
        images_added = added.images_used if added is not None else 0
        skipped = len(gated.unreadable) + (added.images_skipped if added is not None else 0)
        if images_added == 0 and not gated.held:
            msg = f"none of the {len(files)} new images could be read; {job.bank} was not changed."
            raise DataError(msg)
        refused = growth_refusal(k_before, len(new.bank), job.max_new_centroids, job.bank)
        if refused is not None and not job.dry_run:
            raise UpdateRefusedError(refused)
        write = (images_added > 0 or calibration is not None) and refused is None and not job.dry_run
        before = _thresholds(det)
        shared: list[SharedImage] = []
        if write and calibration is not None:
            shared = calibration_in_bank(new, calibration, [Path(p) for p in gated.absorbed])
            warn_calibration_in_bank(shared, len(calibration), str(job.bank))
            with progress_bar("calibration", len(calibration), job.progress):
                new.calibrate(calibration, source="folder")
        stale = new.decision is not None and calibration is None and (
            images_added > 0 or bool(det.record().thresholds_predate_update))
        entry = {
            "parent_sha256": parent,
            "parent_file": escape_path(job.bank),
            "images_added": images_added,
            "images_held": len(gated.held),
            "images_skipped": skipped,
            "vectors_added": new.bank.n_seen - seen_before,
            "gate": multiple,
            "recalibrated": calibration is not None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        summary: dict[str, Any] = {
            **entry,
            "bank_sha256": parent,
            "held_back": [asdict(s) for s in gated.held],
            "absorbed": [asdict(s) for s in gated.passed] if multiple is not None else
                        [{"image": escape_path(p), "score": None, "normalized": None} for p in gated.absorbed],
            "unreadable": gated.unreadable + [escape_path(n) for n in (added.skipped_files if added else ())],
            "gate_score": gated.threshold,
            "n_centroids_before": k_before,
            "n_centroids": len(new.bank),
            "new_centroids": len(new.bank) - k_before,
            "max_new_centroids": job.max_new_centroids,
            "thresholds_predate_update": stale,
            "thresholds_before": before,
            "thresholds": _thresholds(new),
            "calibration_in_bank": [str(x) for x in shared],
            "written": False,
            "dry_run": job.dry_run,
            "refused": refused,
            "history": None,
            "report": None,
        }
        if job.dry_run:
            return {**summary, "seconds": time.perf_counter() - began}
        if write:
            # The build's identity stays, so that ``build --resume`` recognises the file as its own
            # training list, extended (the lineage says by what).
            new.note_update(entry, thresholds_predate_update=summary["thresholds_predate_update"])
            _check_unchanged(job.bank, parent, "while this update ran")  # last look, under the lock
            summary["history"] = _keep_parents(job.bank, out, job.keep_history)
            new.save(out)
            versions.prune(out, job.keep_history)
            summary["written"], summary["bank_sha256"] = True, file_sha256(out)
        summary["report"] = escape_path(report_path(out))
        summary["seconds"] = time.perf_counter() - began
        write_json(report_path(out), summary)
    return summary


def _keep_parents(bank: str, out: Path, keep: int) -> str | None:
    """Keep, in ``out``'s history, the parent ``bank`` and the file ``out`` is about to replace (when another)."""
    kept = versions.archive(out, keep, source=Path(bank))
    if out.is_file() and out.resolve() != Path(bank).resolve():
        versions.archive(out, keep)
    return escape_path(kept) if kept else None


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
