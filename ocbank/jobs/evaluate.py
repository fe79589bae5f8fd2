"""Evaluate banks on labelled test splits; suggest a radius per class."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..data import Sample, class_names, load_split
from ..errors import CheckpointError, DataError
from ..jsonio import write_json
from ..model import metrics
from ..model.calibration import decision_metrics, f1_optimal_threshold
from ..model.detector import Detector
from ..model.features import FeatureExtractor
from .build import SINGLE_BANK
from .report import ReportCollector, write_report
from .visualize import save_overlay

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


def check_complete(bank_file: str | Path, allow_partial: bool = False) -> None:
    """Refuse a build's checkpoint (``*.partial.h5``, metadata ``complete`` false) unless allowed."""
    from ..engine.checkpoint import read_metadata  # noqa: PLC0415

    path = Path(bank_file)
    meta = read_metadata(path)
    partial = meta.get("complete") is False or path.name.endswith(".partial.h5")
    if partial and not allow_partial:
        seen = f"{meta.get('stream_position', '?')} of {meta.get('n_images', '?')}"
        msg = (
            f"{path} is an unfinished build checkpoint (complete: false; images streamed: {seen}). "
            "Finish it with ocbank build --resume, or pass --allow-partial to score with it anyway."
        )
        raise CheckpointError(msg)
    if partial:
        log.warning("scoring with the unfinished checkpoint %s (--allow-partial)", path)


def evaluate(
    cfg: Config,
    banks_dir: str | Path,
    out_dir: str | Path,
    classes: list[str] | None = None,
    heatmaps: int = 4,
    progress: bool = True,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """Score every class's test split with its bank; write metrics.json, scores.csv, heatmaps.

    A metric that cannot be computed (one label only, no anomalous pixel) is ``None``
    with ``<metric>_note`` giving the reason; the mean row averages the defined ones
    and ``mean["n_classes"][metric]`` says how many that was.
    """
    banks, out = Path(banks_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = classes or class_names(cfg)
    extractor: FeatureExtractor | None = None  # one backbone for all classes
    last: tuple[Path, Detector] | None = None  # a single bank serves every class: read it once
    results: dict[str, Any] = {}
    score_rows: list[list[Any]] = []
    collected = ReportCollector()  # a few numbers per image and k overlays per class, for report.html
    for name in names:
        bank_file = banks / f"{name}.h5"
        if not bank_file.is_file() and (banks / f"{SINGLE_BANK}.h5").is_file():
            bank_file = banks / f"{SINGLE_BANK}.h5"  # one bank built over every class
        if not bank_file.is_file():
            msg = f"no bank for class {name!r} at {bank_file}. Run ocbank build first, or fix --banks."
            raise DataError(msg)
        split = load_split(cfg, name)
        if not split.test:
            msg = f"class {name!r} has no test images to evaluate under {cfg.data.root}."
            raise DataError(msg)
        if last is not None and last[0] == bank_file:
            det = last[1]
        else:
            check_complete(bank_file, allow_partial)
            det = Detector.load(bank_file, device=cfg.device, extractor=extractor)
            _check_compatible(det.config, cfg, bank_file)
            det.config = cfg  # the evaluation's data settings; the bank keeps its own metadata
            extractor = det.extractor
            last = (bank_file, det)
        labels, scores, maps, masks, skipped = [], [], [], [], []
        shown = 0
        start = time.perf_counter()
        for res in det.score_batches(split.test, with_masks=True):
            skipped += res.skipped
            for j, idx in enumerate(res.indices):
                sample: Sample = split.test[idx]
                labels.append(sample.label)
                scores.append(float(res.scores[j]))
                score_rows.append([name, sample.path, sample.label, sample.defect, f"{res.scores[j]:.6f}"])
            collected.add_batch(name, res, [split.test[i] for i in res.indices])
            maps.append(res.maps.astype(np.float16))
            if res.masks is not None:  # None for a batch of unreadable images only
                masks.append(res.masks)
            if shown < heatmaps:
                order = [j for j in range(len(res.indices)) if split.test[res.indices[j]].label == 1]
                for j in order[: heatmaps - shown]:
                    stem = Path(str(split.test[res.indices[j]].path)).stem
                    defect = split.test[res.indices[j]].defect
                    save_overlay(
                        out / "heatmaps" / name / f"{defect}_{stem}.png",
                        res.rgb[j], res.maps[j], *_map_range(det), res.masks[j],
                    )
                    shown += 1
        seconds = time.perf_counter() - start
        size = cfg.image_size
        all_maps = np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, size, size), np.float32)
        all_masks = np.concatenate(masks) if masks else np.zeros((0, size, size), np.uint8)
        row: dict[str, Any] = {}
        image_note = metrics.image_metric_note(np.array(labels))
        pixel_note = metrics.pixel_metric_note(all_masks)
        nan = float("nan")
        _set_metric(row, "image_auroc",
                    nan if image_note else metrics.image_auroc(np.array(labels), np.array(scores)), image_note)
        _set_metric(row, "pixel_auroc", nan if pixel_note else metrics.pixel_auroc(all_masks, all_maps), pixel_note)
        _set_metric(row, "aupro", nan if pixel_note else metrics.aupro(all_masks, all_maps), pixel_note)
        collected.end_class(name, all_masks, all_maps, getattr(det, "metadata_", {}), _map_range(det))
        results[name] = {
            **row,
            "n_centroids": len(det.bank),
            "bank_bytes": det.bank.nbytes,
            "radius": det.bank.radius,
            "n_test": len(labels),
            "n_skipped": len(skipped),
            "seconds": seconds,
            "images_per_s": len(labels) / seconds if seconds > 0 else 0.0,
            **_decision_columns(det, np.array(labels), np.array(scores)),
        }
    rows = list(results.values())
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
    report = {"classes": results, "mean": mean, "n_skipped": sum(r["n_skipped"] for r in rows)}
    write_json(out / "metrics.json", report)
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "path", "label", "defect", "score"])
        writer.writerows(score_rows)
    write_report(out, report, collected)
    return report


def _check_compatible(built: Config, now: Config, bank_file: Path) -> None:
    """Features must be made the same way at build and evaluation time."""
    pairs = [("backbone.weights", built.backbone.weights, now.backbone.weights),
             ("backbone.pool", built.backbone.pool, now.backbone.pool),
             ("image size (data.crop or data.resize)", built.image_size, now.image_size)]
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
        out["calibrated"] = {
            **decision_metrics(labels, scores, det.decision.image_threshold),
            "target_false_alarm_rate": det.decision.false_alarm_rate,
            "calibration_images": det.decision.n_images,
            "source": det.decision.source,
        }
    return out


def _map_range(det: Detector) -> tuple[float, float]:
    """Colour scale for overlays: 0 .. 2 r (r = the bank's radius)."""
    return 0.0, 2.0 * det.bank.radius


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
        out[name] = det.radius_statistics(split.train)
    return out
