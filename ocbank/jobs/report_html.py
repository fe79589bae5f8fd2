"""Rendering the evaluation report: ``report.html`` beside metrics.json (the presentation half).

The per-class table (image AUROC, pixel AUROC, AUPRO, K, bank MB, img/s), each
class's image ROC and PRO curves, the decision threshold with its confusion
matrix, and the highest-scoring normal images and lowest-scoring anomalies
with their heatmaps. One folder that opens from disk: inline CSS, PNGs under
``report_files/`` linked relatively, no script, no network. The page is the
Jinja2 template ``templates/report.html.j2`` (package data); this module makes the
PNGs and hands the template formatted values. What is shown comes from
:mod:`ocbank.jobs.report`.
"""

from __future__ import annotations

import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from .._version import __version__
from ..model.calibration import is_ng
from ..model.metrics import PRO_FPR_LIMIT, image_metric_note
from .report import ClassData, ReportCollector, Threshold, threshold_for
from .visualize import save_overlay

REPORT_NAME = "report.html"
FILES_DIR = "report_files"
TEMPLATE = "report.html.j2"
GALLERY_TITLES = {
    "normals": "Highest-scoring normal images (false-alarm candidates)",
    "anomalies": "Lowest-scoring defective images (miss candidates)",
}


def _plot_curves(data: ClassData, path: Path, threshold: Threshold) -> None:
    """ROC (image level) and PRO (pixel level, FPR <= 0.3) side by side as one PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from sklearn.metrics import roc_curve  # noqa: PLC0415

    labels, scores = np.array(data.labels), np.array(data.scores)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.6, 3.2), dpi=90)
    why = image_metric_note(labels, scores)  # None when the ROC is defined
    if why is None:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax1.plot(fpr, tpr, color="#1f5fa8", lw=2)
        ax1.fill_between(fpr, tpr, step=None, alpha=0.12, color="#1f5fa8")
        if threshold.source != "none":
            pred = is_ng(scores, threshold.value)
            op = (pred[labels == 0].mean(), pred[labels == 1].mean())
            ax1.plot(*op, "o", color="#d1495b", ms=7, label=f"threshold {threshold.value:.3g}")
            ax1.legend(loc="lower right", fontsize=8, frameon=False)
    else:
        ax1.text(0.5, 0.5, why, ha="center", va="center", wrap=True, fontsize=8)
    ax1.plot([0, 1], [0, 1], ls=":", color="#999")
    ax1.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate (normal images)",
            ylabel="true positive rate", title="image ROC")
    if data.pro is not None and data.pro[0].size:
        ax2.plot(*data.pro, color="#2a9d8f", lw=2)
        ax2.fill_between(*data.pro, alpha=0.12, color="#2a9d8f")
    else:
        ax2.text(0.15, 0.5, "no defect regions", ha="center", va="center")
    ax2.set(xlim=(0, PRO_FPR_LIMIT), ylim=(0, 1.02), xlabel="false positive rate (normal pixels)",
            ylabel="per-region overlap", title="PRO (AUPRO up to FPR 0.3)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _gallery(data: ClassData, folder: Path, rel: str) -> dict[str, list[dict[str, Any]]]:
    """Write the overlays (crop | heatmap | ground truth) and return their captions."""
    out: dict[str, list[dict[str, Any]]] = {"normals": [], "anomalies": []}
    groups = {"normals": sorted(data.high_normals, key=lambda t: -t[2].score),
              "anomalies": sorted(data.low_anomalies, key=lambda t: t[2].score)}
    for group, items in groups.items():
        for i, (_, _, s) in enumerate(items):
            name = f"{group}_{i + 1}.png"
            mask = s.mask if s.label else None  # a normal image's mask is empty: no black panel
            save_overlay(folder / name, s.rgb, s.amap.astype(np.float32), *data.map_range, mask)
            out[group].append({"src": f"{rel}/{name}", "path": s.path, "defect": s.defect, "score": s.score,
                                "label": s.label})
    return out


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _rate(k: int, n: int) -> str:
    return "n/a" if n == 0 else f"{k}/{n} = {100 * k / n:.1f} %"


def _cell(value: Any, text: str, bar: bool = False) -> dict[str, Any]:
    """A table cell: ``value`` exactly (repr, for machines), ``text`` for people, an optional bar width in px."""
    width = None
    if bar and isinstance(value, float) and not math.isnan(value):
        width = f"{max(0.0, min(1.0, value)) * 60:.0f}"
    return {"value": repr(value), "text": text, "bar": width}


def _table(report: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for name, r in [*report["classes"].items(), ("mean", report["mean"])]:
        rows.append({"name": name, "is_mean": name == "mean", "cells": [
            _cell(r["image_auroc"], _pct(r["image_auroc"]), bar=True),
            _cell(r["pixel_auroc"], _pct(r["pixel_auroc"]), bar=True),
            _cell(r["aupro"], _pct(r["aupro"]), bar=True),
            _cell(r["n_centroids"], f"{r['n_centroids']:.0f}"),
            _cell(r["bank_bytes"], f"{r['bank_bytes'] / 1e6:.2f}"),
            _cell(r["images_per_s"], f"{r['images_per_s']:.1f}"),
        ]})
    head = ("class", "image AUROC %", "pixel AUROC %", "AUPRO %", "K", "bank MB", "img/s")
    return {"head": head, "rows": rows}


def _threshold(t: Threshold) -> dict[str, Any]:
    return {"source": t.source, "note": t.note, "value": repr(t.value), "text": f"{t.value:.4g}",
            "tp": t.tp, "fp": t.fp, "fn": t.fn, "tn": t.tn,
            "false_alarm": _rate(t.fp, t.fp + t.tn), "miss": _rate(t.fn, t.fn + t.tp)}


def _figures(items: list[dict[str, Any]], threshold: Threshold) -> list[dict[str, Any]]:
    figures = []
    for it in items:
        verdict, right = "", False
        if threshold.source != "none":
            ng = bool(is_ng(it["score"], threshold.value))
            verdict, right = ("NG" if ng else "OK"), ng == bool(it["label"])
        path = Path(it["path"])
        figures.append({"src": it["src"], "label": f"{path.parent.name}/{path.name}", "score": f"{it['score']:.4g}",
                        "verdict": verdict, "right": right})
    return figures


def _environment() -> jinja2.Environment:
    loader = jinja2.PackageLoader("ocbank.jobs", "templates")
    return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)


def write_report(out_dir: str | Path, report: dict[str, Any], collected: ReportCollector) -> Path:
    """Write ``out_dir/report.html`` and ``out_dir/report_files/`` from evaluate's report and the collector."""
    out = Path(out_dir)
    files = out / FILES_DIR
    if files.is_dir():
        shutil.rmtree(files)  # a previous run's images would linger
    files.mkdir(parents=True)
    sections = []
    for idx, (name, data) in enumerate(collected.classes.items()):
        rel = f"{FILES_DIR}/c{idx:03d}"  # class names may hold characters unsafe in URLs
        (out / rel).mkdir(parents=True, exist_ok=True)
        threshold = threshold_for(data)
        _plot_curves(data, out / rel / "curves.png", threshold)
        gallery = _gallery(data, out / rel, rel)
        r = report["classes"].get(name, {})
        sections.append({
            "name": name,
            "n_images": len(data.labels),
            "n_defective": int(np.sum(np.array(data.labels) > 0)),
            "image_auroc": _pct(r.get("image_auroc")),
            "aupro": _pct(r.get("aupro")),
            "n_centroids": f"{r.get('n_centroids', 0):.0f}",
            "radius": f"{r.get('radius', float('nan')):.3g}",
            "curves": f"{rel}/curves.png",
            "threshold": _threshold(threshold),
            "galleries": [{"title": GALLERY_TITLES[g], "figures": _figures(gallery[g], threshold)} for g in GALLERY_TITLES],
        })
    page = _environment().get_template(TEMPLATE).render(
        n_classes=len(report["classes"]),
        version=__version__,
        stamp=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),  # noqa: UP017  (3.10 has no datetime.UTC)
        table=_table(report),
        sections=sections,
    )
    path = out / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path
