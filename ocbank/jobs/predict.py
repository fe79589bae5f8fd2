"""Score new images with one bank: scores.csv, heatmap overlays and raw maps."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data import IMAGE_SUFFIXES, Sample
from ..errors import DataError
from ..model.detector import Detector, ScoredBatch
from .evaluate import _map_range
from .visualize import save_overlay


def predict(
    bank_file: str | Path, inputs: list[str], out_dir: str | Path, save_maps: bool = False, progress: bool = True,
    device: str | None = None, save_masks: bool = False,
) -> list[dict[str, Any]]:
    """Score images (files or folders) with one bank; write scores.csv and overlay PNGs."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            msg = f"input {p} does not exist. Pass image files or folders."
            raise DataError(msg)
    if not files:
        msg = f"no images found in {inputs}. Supported suffixes: {sorted(IMAGE_SUFFIXES)}."
        raise DataError(msg)
    det = Detector.load(bank_file, device=device)
    out = Path(out_dir)
    (out / "maps" if save_maps else out).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    vmin, vmax = _map_range(det)
    for res in det.score_batches([Sample(str(f)) for f in files]):
        for idx in res.skipped:
            rows.append({"path": str(files[idx]), "score": float("nan"), "status": "unreadable"})
        for j, idx in enumerate(res.indices):
            f = files[idx]
            name = f"{idx:05d}_{f.stem}"
            save_overlay(out / "heatmaps" / f"{name}.png", res.rgb[j], res.maps[j], vmin, vmax)
            if save_maps:
                np.save(out / "maps" / f"{name}.npy", res.maps[j])
            rows.append({"path": str(f), "score": float(res.scores[j]), "status": "ok", **_decision_row(det, res, j)})
            if save_masks and det.decision is not None:
                mask = (res.maps[j] > det.decision.pixel_threshold).astype(np.uint8) * 255
                (out / "masks").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(out / "masks" / f"{name}.png")
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "score", "label", "normalized_score", "status"], restval="")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _decision_row(det: Detector, res: ScoredBatch, j: int) -> dict[str, Any]:
    """OK/NG and the normalised score (score / calibrated threshold), when the bank is calibrated."""
    if det.decision is None:
        return {"label": "", "normalized_score": ""}
    score = float(res.scores[j])
    label = "NG" if score > det.decision.image_threshold else "OK"
    return {"label": label, "normalized_score": score / det.decision.image_threshold}
