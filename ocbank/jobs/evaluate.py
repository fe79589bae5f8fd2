"""Evaluate banks on labelled test splits; suggest a radius per class."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..data import Sample, class_names, load_split
from ..errors import DataError
from ..model import metrics
from ..model.detector import Detector
from ..model.features import FeatureExtractor
from .build import SINGLE_BANK
from .report import ReportCollector, write_report
from .visualize import save_overlay

log = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro")


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def evaluate(
    cfg: Config,
    banks_dir: str | Path,
    out_dir: str | Path,
    classes: list[str] | None = None,
    heatmaps: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every class's test split with its bank; write metrics.json, scores.csv, heatmaps."""
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
            msg = f"class {name!r} has no test images to evaluate under {cfg.data['root']}."
            raise DataError(msg)
        if last is not None and last[0] == bank_file:
            det = last[1]
        else:
            det = Detector.load(bank_file, device=cfg.device, progress=progress, extractor=extractor)
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
        all_maps = np.concatenate(maps).astype(np.float32)
        all_masks = np.concatenate(masks)
        collected.end_class(name, all_masks, all_maps, getattr(det, "metadata_", {}), _map_range(det))
        results[name] = {
            "image_auroc": metrics.image_auroc(np.array(labels), np.array(scores)),
            "pixel_auroc": metrics.pixel_auroc(all_masks, all_maps),
            "aupro": metrics.aupro(all_masks, all_maps),
            "n_centroids": len(det.bank),
            "bank_bytes": det.bank.nbytes,
            "radius": det.bank.radius,
            "n_test": len(labels),
            "n_skipped": len(skipped),
            "seconds": seconds,
            "images_per_s": len(labels) / seconds,
        }
    rows = list(results.values())
    mean = {k: _mean(rows, k) for k in (*METRIC_KEYS, "n_centroids", "bank_bytes", "images_per_s")}
    report = {"classes": results, "mean": mean}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "path", "label", "defect", "score"])
        writer.writerows(score_rows)
    write_report(out, report, collected)
    return report


def _check_compatible(built: Config, now: Config, bank_file: Path) -> None:
    """Features must be made the same way at build and evaluation time."""
    pairs = [("backbone.weights", built.backbone["weights"], now.backbone["weights"]),
             ("backbone.pool", built.backbone["pool"], now.backbone["pool"]),
             ("image size (data.crop or data.resize)", built.image_size, now.image_size)]
    for key, then, here in pairs:
        if then != here:
            msg = f"{bank_file} was built with {key} = {then!r}, but this config has {here!r}. Use the build's config."
            raise DataError(msg)


def _map_range(det: Detector) -> tuple[float, float]:
    """Colour scale for overlays: 0 .. 2 r (r = the bank's radius)."""
    return 0.0, 2.0 * det.bank.radius


def format_table(report: dict[str, Any]) -> str:
    """The per-class table (like the paper's Table 2) with a mean row."""
    head = f"{'class':<16}{'img AUROC':>10}{'pix AUROC':>10}{'AUPRO':>8}{'K':>8}{'bank MB':>9}{'img/s':>8}"
    lines = [head, "-" * len(head)]

    def pct(v: float) -> str:
        return "   n/a" if v is None or math.isnan(v) else f"{100 * v:6.1f}"

    for name, r in [*report["classes"].items(), ("mean", report["mean"])]:
        lines.append(
            f"{name:<16}{pct(r['image_auroc']):>10}{pct(r['pixel_auroc']):>10}{pct(r['aupro']):>8}"
            f"{r['n_centroids']:>8.0f}{r['bank_bytes'] / 1e6:>9.2f}{r['images_per_s']:>8.1f}"
        )
    return "\n".join(lines)


def suggest_radius(cfg: Config, classes: list[str] | None = None, progress: bool = True) -> dict[str, dict[str, float]]:
    """The radius rule's percentiles per class."""
    out: dict[str, dict[str, float]] = {}
    cfg_auto = Config({**cfg.raw, "bank": {**cfg.bank, "radius": "auto"}}, cfg.source)
    extractor: FeatureExtractor | None = None  # one backbone for all classes
    for name in classes or class_names(cfg):
        split = load_split(cfg, name)
        if not split.train:
            msg = f"class {name!r} has no training images under {cfg.data['root']}."
            raise DataError(msg)
        det = Detector(cfg_auto, progress=progress, extractor=extractor)
        extractor = det.extractor
        _, stats = det.choose_radius(split.train)
        out[name] = stats
    return out
