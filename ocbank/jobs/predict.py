"""Score new images with one bank: scores.csv, heatmap overlays and raw maps."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from ..data import IMAGE_SUFFIXES, Sample
from ..errors import DataError
from ..model.detector import Detector
from .evaluate import _map_range
from .visualize import save_overlay


def predict(
    bank_file: str | Path, inputs: list[str], out_dir: str | Path, save_maps: bool = False, progress: bool = True,
    device: str | None = None,
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
    det = Detector.load(bank_file, device=device, progress=progress)
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
            rows.append({"path": str(f), "score": float(res.scores[j]), "status": "ok"})
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "score", "status"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
