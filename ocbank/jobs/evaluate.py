"""Evaluate banks on labelled test splits; suggest a radius per class."""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..data import Sample, class_names, escape_path, fit_name, load_split
from ..engine.checkpoint import bank_file_path
from ..errors import DataError
from ..jsonio import write_json
from ..model import metrics
from ..model.builder import radius_sample
from ..model.calibration import decision_metrics, f1_optimal_threshold, transfer_warning
from ..model.detector import Detector
from ..model.features import FeatureExtractor
from ..model.progress import progress_bar, with_progress
from .build import SINGLE_BANK
from .report import ReportCollector
from .report_html import write_report
from .visualize import map_range, save_overlay, write_output

log = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro")


def _mean(rows: list[dict[str, Any]], key: str) -> tuple[float | None, int]:
    """Mean of the defined (non-null) values, and how many there were."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return (float(np.mean(vals)) if vals else None), len(vals)


def _set_metric(row: dict[str, Any], key: str, value: float, note: str | None) -> None:
    """``row[key]`` = value, or null with ``row[key + '_note']`` saying why it is undefined."""
    if note is None and math.isfinite(value):
        row[key] = float(value)
        return
    row[key] = None
    row[f"{key}_note"] = note or f"{key} is undefined for this data"


@dataclass
class _ClassScores:
    """What one class's test split produced: per image, and the maps/masks the pixel metrics need."""

    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    csv_rows: list[list[Any]] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)  # float16 [B, S, S] per batch
    masks: list[np.ndarray] = field(default_factory=list)  # uint8 [B, S, S] per batch
    skipped: list[int] = field(default_factory=list)
    outputs_failed: int = 0  # overlays that could not be written (each named in a warning)
    seconds: float = 0.0


def _bank_file(banks: Path, name: str) -> Path:
    """``<class>.h5``, or the single bank built over every class."""
    bank_file = bank_file_path(banks, name)
    if not bank_file.is_file() and bank_file_path(banks, SINGLE_BANK).is_file():
        bank_file = bank_file_path(banks, SINGLE_BANK)
    if not bank_file.is_file():
        msg = f"no bank for class {name!r} at {bank_file}. Run ocbank build first, or fix --banks."
        raise DataError(msg)
    return bank_file


def _score_class(
    det: Detector, name: str, split: Any, out: Path, heatmaps: int, collected: ReportCollector, progress: bool = False
) -> _ClassScores:
    """Score a class's test split batch by batch; write up to ``heatmaps`` overlays of anomalies."""
    got = _ClassScores()
    shown = 0
    lo, hi = map_range(det.bank.radius_)
    start = time.perf_counter()
    for res in with_progress(det.score_batches(split.test, with_masks=True), f"evaluate {name}", len(split.test), progress):
        got.skipped += res.skipped
        samples: list[Sample] = [split.test[i] for i in res.indices]
        as_text = [replace(s, path=escape_path(s.path)) for s in samples]  # names as the CSV and report show them
        for j, sample in enumerate(as_text):
            got.labels.append(sample.label)
            got.scores.append(float(res.scores[j]))
            got.csv_rows.append([name, sample.path, sample.label, sample.defect, f"{res.scores[j]:.6f}"])
        collected.add_batch(name, res, as_text)
        got.maps.append(res.maps.astype(np.float16))
        if res.masks is not None:  # None for a batch of unreadable images only
            got.masks.append(res.masks)
        for j in [j for j, s in enumerate(samples) if s.label == 1][: max(heatmaps - shown, 0)]:
            stem = Path(str(samples[j].path)).stem
            target = out / "heatmaps" / name / fit_name(f"{samples[j].defect}_{stem}", ".png")
            overlay = partial(save_overlay, rgb=res.rgb[j], amap=res.maps[j], vmin=lo, vmax=hi, mask=res.masks[j])
            got.outputs_failed += not write_output(target, overlay)  # one that cannot be written loses nothing else
            shown += 1
    got.seconds = time.perf_counter() - start
    return got


def _class_row(det: Detector, got: _ClassScores, size: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The class's metrics row (null metrics with a note), and its maps and masks [N, S, S]."""
    maps = np.concatenate(got.maps).astype(np.float32) if got.maps else np.zeros((0, size, size), np.float32)
    masks = np.concatenate(got.masks) if got.masks else np.zeros((0, size, size), np.uint8)
    labels, scores = np.array(got.labels), np.array(got.scores, dtype=np.float64)
    row: dict[str, Any] = {}
    # A NaN score is NG by the decision rule, but it has no rank, so the metrics that rank
    # scores (AUROC, the F1-optimal threshold) are undefined.
    n_nan = int((~np.isfinite(scores)).sum())
    image_note = metrics.image_metric_note(labels, scores)
    pixel_note = metrics.pixel_metric_note(masks, maps)
    nan = float("nan")
    _set_metric(row, "image_auroc", nan if image_note else metrics.image_auroc(labels, scores), image_note)
    _set_metric(row, "pixel_auroc", nan if pixel_note else metrics.pixel_auroc(masks, maps), pixel_note)
    _set_metric(row, "aupro", nan if pixel_note else metrics.aupro(masks, maps), pixel_note)
    row.update({
        "n_centroids": len(det.bank),
        "bank_bytes": det.bank.nbytes,
        "radius": det.bank.radius_,
        "n_test": len(labels),
        "images_skipped": len(got.skipped),
        "n_nan_scores": n_nan,
        "seconds": got.seconds,
        "images_per_s": len(labels) / got.seconds if got.seconds > 0 else 0.0,
        **_decision_columns(det, labels, scores),
    })
    if n_nan:  # f1_optimal is None: say why
        row["f1_optimal_note"] = image_note
    return row, maps, masks


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over classes of the defined values; ``n_classes`` says how many each metric averaged."""
    mean: dict[str, Any] = {}
    counted: dict[str, int] = {}
    for key in (*METRIC_KEYS, "n_centroids", "bank_bytes", "images_per_s"):
        mean[key], counted[key] = _mean(rows, key)
        if mean[key] is None:
            mean[f"{key}_note"] = f"undefined for all {len(rows)} classes"
    mean["n_classes"] = {k: counted[k] for k in METRIC_KEYS}
    calibrated = [r["calibrated"] for r in rows if r.get("calibrated")]
    for key in ("false_alarm_rate", "recall"):
        mean[key] = _mean(calibrated, key)[0]
    return mean


def evaluate(
    cfg: Config,
    banks_dir: str | Path,
    out_dir: str | Path,
    classes: list[str] | None = None,
    heatmaps: int = 4,
    progress: bool = True,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """Score every class's test split with its bank; write metrics.json, scores.csv, heatmaps, report.html.

    A metric that cannot be computed (one label only, no anomalous pixel) is ``None``
    with ``<metric>_note`` giving the reason; the mean row averages the defined ones
    and ``mean["n_classes"][metric]`` says how many that was.
    """
    banks, out = Path(banks_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extractor: FeatureExtractor | None = None  # one backbone for all classes
    last: tuple[Path, Detector] | None = None  # a single bank serves every class: read it once
    results: dict[str, Any] = {}
    csv_rows: list[list[Any]] = []
    outputs_failed = 0
    collected = ReportCollector()  # a few numbers per image and k overlays per class, for report.html
    for name in classes or class_names(cfg):
        bank_file = _bank_file(banks, name)
        split = load_split(cfg, name)
        if not split.test:
            msg = f"class {name!r} has no test images to evaluate under {cfg.data.root}."
            raise DataError(msg)
        if last is None or last[0] != bank_file:
            det = Detector.load(bank_file, device=cfg.device, extractor=extractor, allow_partial=allow_partial)
            _check_compatible(det.config, cfg, bank_file)
            det.read_with(cfg.data)  # the evaluation's folder and loader settings; the bank keeps its record
            extractor = det.extractor
            last = (bank_file, det)
        det = last[1]
        got = _score_class(det, name, split, out, heatmaps, collected, progress)
        outputs_failed += got.outputs_failed
        results[name], maps, masks = _class_row(det, got, cfg.image_size)
        if results[name]["n_nan_scores"]:
            log.warning("class %s: %d test image score(s) are NaN (a failed computation): counted NG, "
                        "image metrics null", name, results[name]["n_nan_scores"])
        if (results[name]["calibrated"] or {}).get("transfer_warning"):
            log.warning("class %s: %s", name, results[name]["calibrated"]["transfer_warning"])
        collected.end_class(name, masks, maps, det.decision, map_range(det.bank.radius_))
        csv_rows += got.csv_rows
    rows = list(results.values())
    report = {"classes": results, "mean": _mean_row(rows), "images_skipped": sum(r["images_skipped"] for r in rows),
              "n_nan_scores": sum(r["n_nan_scores"] for r in rows), "n_outputs_failed": outputs_failed}
    write_json(out / "metrics.json", report)
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "path", "label", "defect", "score"])
        writer.writerows(csv_rows)
    write_report(out, report, collected)
    return report


def _check_compatible(built: Config, now: Config, bank_file: Path) -> None:
    """Features must be made the same way at build and evaluation time."""
    pairs = [("backbone.weights", built.backbone.weights, now.backbone.weights),
             ("backbone.pool", built.backbone.pool, now.backbone.pool),
             ("image size (data.crop or data.resize)", built.image_size, now.image_size),
             ("data.resize", built.data.resize, now.data.resize),
             ("backbone.autocast", built.backbone.autocast, now.backbone.autocast),
             ("scoring.mode", built.scoring.mode, now.scoring.mode),
             ("scoring.window", built.scoring.window, now.scoring.window),
             ("scoring.grid_sigma", built.scoring.grid_sigma, now.scoring.grid_sigma),
             ("scoring.sigma (the pixel threshold's units)", built.scoring.sigma, now.scoring.sigma)]
    for key, then, here in pairs:
        if then != here:
            msg = f"{bank_file} was built with {key} = {then!r}, but this config has {here!r}. Use the build's config."
            raise DataError(msg)


def _decision_columns(det: Detector, labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """How the calibrated threshold does on the labelled test set, and the F1-optimal threshold."""
    out: dict[str, Any] = {"f1_optimal": f1_optimal_threshold(labels, scores)}
    if det.decision is None:
        out["calibrated"] = None
        out["calibrated_note"] = "the bank has no calibrated threshold (build with a hold-out or --calibration)"
    else:
        measured = decision_metrics(labels, scores, det.decision.image_threshold)
        out["calibrated"] = {
            **measured,
            "target_false_alarm_rate": det.decision.false_alarm_rate,
            "calibration_images": det.decision.n_images,
            "source": det.decision.source,
            "transfer_warning": transfer_warning(det.decision, measured["fp"], measured["fp"] + measured["tn"]),
        }
    return out


def format_table(report: dict[str, Any]) -> str:
    """The per-class table (like the paper's Table 2) with a mean row."""
    head = (
        f"{'class':<16}{'img AUROC':>10}{'pix AUROC':>10}{'AUPRO':>8}{'K':>8}{'bank MB':>9}{'img/s':>8}"
        f"{'NG thr':>9}{'FAR %':>7}{'recall %':>9}"
    )
    lines = [head, "-" * len(head)]

    def pct(v: float | None) -> str:
        return "   n/a" if v is None or math.isnan(v) else f"{100 * v:6.1f}"

    def num(v: float | None, scale: float, fmt: str) -> str:
        return "n/a" if v is None else format(v / scale, fmt)

    notes: list[str] = []
    for name, r in [*report["classes"].items(), ("mean", report["mean"])]:
        cal = r.get("calibrated") or {}
        thr = f"{cal['threshold']:9.2f}" if "threshold" in cal else f"{'-':>9}"
        lines.append(
            f"{name:<16}{pct(r['image_auroc']):>10}{pct(r['pixel_auroc']):>10}{pct(r['aupro']):>8}"
            f"{num(r['n_centroids'], 1, '.0f'):>8}{num(r['bank_bytes'], 1e6, '.2f'):>9}"
            f"{num(r['images_per_s'], 1, '.1f'):>8}"
            f"{thr}{pct(r.get('false_alarm_rate', cal.get('false_alarm_rate'))):>7}"
            f"{pct(r.get('recall', cal.get('recall'))):>9}"
        )
        if name != "mean":
            notes += [f"  {name}: {k} n/a: {r[f'{k}_note']}" for k in METRIC_KEYS if r.get(f"{k}_note")]

    counts = report["mean"].get("n_classes", {})
    if any(v != len(report["classes"]) for v in counts.values()):
        notes.append("  mean over classes with a defined value: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines + notes)


def suggest_radius(cfg: Config, classes: list[str] | None = None, progress: bool = True) -> dict[str, dict[str, float]]:
    """The radius rule's percentiles per class."""
    out: dict[str, dict[str, float]] = {}
    cfg_auto = cfg.replace(bank={"radius": "auto"})
    extractor: FeatureExtractor | None = None  # one backbone for all classes
    for name in classes or class_names(cfg):
        split = load_split(cfg, name)
        if not split.train:
            msg = f"class {name!r} has no training images under {cfg.data.root}."
            raise DataError(msg)
        det = Detector.from_config(cfg_auto, extractor=extractor)
        extractor = det.extractor
        with progress_bar(f"radius {name}", len(radius_sample(len(split.train), cfg_auto)), progress):
            out[name] = det.radius_statistics(split.train).to_dict()
    return out
