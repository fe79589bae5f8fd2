"""Score new images with one bank: scores.csv, heatmap overlays and raw maps."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data import Sample, list_inputs
from ..errors import ConfigError, DataError
from ..model.detector import Detector, ScoredBatch
from .evaluate import check_complete
from .visualize import map_range, save_overlay

OVERLAYS = ("all", "ng", "none")  # which images get a heatmap overlay PNG


def predict(
    bank_file: str | Path, inputs: list[str], out_dir: str | Path, save_maps: bool = False, progress: bool = True,
    device: str | None = None, allow_partial: bool = False, save_masks: bool = False, overlays: str = "all",
) -> list[dict[str, Any]]:
    """Score images (files or folders) with one bank; write scores.csv and overlay PNGs.

    Returns one row per input file, in input order: ``path``, ``score`` (NaN when
    unreadable), ``label`` (OK/NG) and ``normalized_score`` (score / calibrated threshold)
    when the bank is calibrated, and ``status`` ("ok" or "unreadable"); scores.csv holds the same rows
    (an empty score for unreadable files). A ``*.partial.h5`` checkpoint is refused
    unless ``allow_partial``.
    """
    files = list_inputs(inputs)
    check_complete(bank_file, allow_partial)
    det = Detector.load(bank_file, device=device)
    if overlays not in OVERLAYS:
        msg = f"overlays must be one of {OVERLAYS}, got {overlays!r}."
        raise ConfigError(msg)
    if overlays == "ng" and det.decision is None:
        msg = f"--overlays ng needs a calibrated bank, and {bank_file} has no thresholds. Use --overlays all."
        raise DataError(msg)
    out = Path(out_dir)
    (out / "maps" if save_maps else out).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any] | None] = [None] * len(files)
    vmin, vmax = map_range(det.bank.radius)
    for res in det.score_batches([Sample(str(f)) for f in files]):
        for idx in res.skipped:
            rows[idx] = {"path": str(files[idx]), "score": float("nan"), "status": "unreadable"}
        for j, idx in enumerate(res.indices):
            f = files[idx]
            name = f"{idx:05d}_{f.stem}"
            if overlays == "all" or (overlays == "ng" and res.scores[j] > det.decision.image_threshold):
                save_overlay(out / "heatmaps" / f"{name}.png", res.rgb[j], res.maps[j], vmin, vmax)
            if save_maps:
                np.save(out / "maps" / f"{name}.npy", res.maps[j])
            rows[idx] = {"path": str(f), "score": float(res.scores[j]), "status": "ok", **_decision_row(det, res, j)}
            if save_masks and det.decision is not None:
                mask = (res.maps[j] > det.decision.pixel_threshold).astype(np.uint8) * 255
                (out / "masks").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(out / "masks" / f"{name}.png")
    missing = [str(files[i]) for i, r in enumerate(rows) if r is None]
    if missing:  # the loader reports every index as scored or skipped; anything else is a bug
        msg = f"internal error: no result for {missing[:3]}"
        raise RuntimeError(msg)
    done: list[dict[str, Any]] = [r for r in rows if r is not None]
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "score", "label", "normalized_score", "status"], restval="")
        writer.writeheader()
        writer.writerows({**r, "score": "" if r["status"] != "ok" else f"{r['score']:.6f}"} for r in done)
    return done


def _decision_row(det: Detector, res: ScoredBatch, j: int) -> dict[str, Any]:
    """OK/NG and the normalised score (score / calibrated threshold), when the bank is calibrated."""
    if det.decision is None:
        return {"label": "", "normalized_score": ""}
    score = float(res.scores[j])
    label = "NG" if score > det.decision.image_threshold else "OK"
    return {"label": label, "normalized_score": score / det.decision.image_threshold}
