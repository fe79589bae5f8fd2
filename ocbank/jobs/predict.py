"""Score new images with one bank: scores.csv, heatmap overlays and raw maps."""

from __future__ import annotations

import csv
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data import Sample, escape_path, fit_name, list_inputs
from ..errors import ConfigError, DataError
from ..model.calibration import Verdict
from ..model.detector import Detector
from ..model.progress import with_progress
from .visualize import map_range, save_overlay, write_output

OVERLAYS = ("all", "ng", "none")  # which images get a heatmap overlay PNG


def predict(
    bank_file: str | Path, inputs: list[str], out_dir: str | Path, save_maps: bool = False, progress: bool = True,
    device: str | None = None, allow_partial: bool = False, save_masks: bool = False, overlays: str = "all",
) -> list[dict[str, Any]]:
    """Score images (files or folders) with one bank; write scores.csv and overlay PNGs.

    Returns one row per input file, in input order: ``path``, ``score`` (NaN when
    unreadable), ``label`` (OK/NG) and ``normalized`` (score / calibrated threshold)
    when the bank is calibrated, ``status`` ("ok" or "unreadable") and, for scored images,
    ``outputs_failed`` (overlays, maps or masks that could not be written, each named in a
    warning). scores.csv holds the same rows (an empty score for unreadable files; paths as
    :func:`ocbank.data.escape_path` writes them). Output names are ``<position>_<stem>``, cut
    to fit the file system's name limit. A ``*.partial.h5`` checkpoint is refused unless
    ``allow_partial``; ``overlays="ng"`` and ``save_masks`` need a calibrated bank.
    """
    files = list_inputs(inputs)
    det = Detector.load(bank_file, device=device, allow_partial=allow_partial)
    if overlays not in OVERLAYS:
        msg = f"overlays must be one of {OVERLAYS}, got {overlays!r}."
        raise ConfigError(msg)
    for wanted, flag, fix in ((overlays == "ng", "--overlays ng", "Use --overlays all"),
                              (save_masks, "--save-masks", "Drop --save-masks, or calibrate the bank")):
        if wanted and det.decision is None:
            msg = f"{flag} needs a calibrated bank, and {bank_file} has no thresholds. {fix}."
            raise DataError(msg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any] | None] = [None] * len(files)
    vmin, vmax = map_range(det.bank.radius_)
    for res in with_progress(det.score_batches([Sample(str(f)) for f in files]), "predict", len(files), progress):
        verdict = None if det.decision is None else det.decision.apply(res.scores, res.maps if save_masks else None)
        for idx in res.skipped:
            rows[idx] = {"path": str(files[idx]), "score": float("nan"), "status": "unreadable"}
        for j, idx in enumerate(res.indices):
            f = files[idx]
            stem = f"{idx:05d}_{f.stem}"  # the input's position keeps cut names apart
            writes: list[tuple[Path, Callable[[Path], None]]] = []
            if overlays == "all" or (overlays == "ng" and verdict.ng[j]):
                writes.append((out / "heatmaps" / fit_name(stem, ".png"),
                               partial(save_overlay, rgb=res.rgb[j], amap=res.maps[j], vmin=vmin, vmax=vmax)))
            if save_maps:
                writes.append((out / "maps" / fit_name(stem, ".npy"), partial(_save_npy, res.maps[j])))
            if save_masks:
                mask = verdict.mask[j].astype(np.uint8) * 255
                writes.append((out / "masks" / fit_name(stem, ".png"), partial(_save_png, mask)))
            failed = [target for target, write in writes if not write_output(target, write)]
            rows[idx] = {"path": str(f), "score": float(res.scores[j]), "status": "ok", **_decision_row(verdict, j),
                         "outputs_failed": len(failed)}
    missing = [str(files[i]) for i, r in enumerate(rows) if r is None]
    if missing:  # the loader reports every index as scored or skipped; anything else is a bug
        msg = f"internal error: no result for {missing[:3]}"
        raise RuntimeError(msg)
    written_rows: list[dict[str, Any]] = [r for r in rows if r is not None]
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "score", "label", "normalized", "status"], restval="",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "path": escape_path(r["path"]), "score": "" if r["status"] != "ok" else f"{r['score']:.6f}"}
                         for r in written_rows)
    return written_rows


def _save_npy(amap: np.ndarray, target: Path) -> None:
    np.save(target, amap)


def _save_png(mask: np.ndarray, target: Path) -> None:
    Image.fromarray(mask).save(target)


def _decision_row(verdict: Verdict | None, j: int) -> dict[str, Any]:
    """OK/NG and the normalised score (score / calibrated threshold), when the bank is calibrated."""
    if verdict is None:
        return {"label": "", "normalized": ""}
    return {"label": "NG" if verdict.ng[j] else "OK", "normalized": float(verdict.normalized[j])}
