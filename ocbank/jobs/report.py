"""A self-contained HTML report of an evaluation: ``report.html`` beside metrics.json.

The per-class table (image AUROC, pixel AUROC, AUPRO, K, bank MB, img/s), each
class's image ROC and PRO curves, the decision threshold with its confusion
matrix, and the highest-scoring normal images and lowest-scoring anomalies
with their heatmaps. One folder that opens from disk: inline CSS, PNGs under
``report_files/`` linked relatively, no script, no network.

:class:`ReportCollector` gathers what the report needs while ``evaluate``
streams: per-image scores, labels and paths, a few overlays (bounded heaps,
k per class) and the curves, computed while evaluate holds a class's maps.
"""

from __future__ import annotations

import heapq
import html
import itertools
import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..model.calibration import Decision, decision_metrics, f1_optimal_threshold, is_ng, transfer_warning
from ..model.metrics import PRO_FPR_LIMIT, pro_curve
from .visualize import save_overlay

REPORT_NAME = "report.html"
FILES_DIR = "report_files"
MAX_CURVE_POINTS = 400


@dataclass(frozen=True)
class Shown:
    """One image kept for the gallery: RGB crop uint8 [S, S, 3], map float16 [S, S], mask uint8 [S, S] or None."""

    path: str
    defect: str
    label: int
    score: float
    rgb: np.ndarray
    amap: np.ndarray
    mask: np.ndarray | None


@dataclass
class ClassData:
    """What the report shows for one class."""

    paths: list[str] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    high_normals: list[tuple[float, int, Shown]] = field(default_factory=list)  # min-heap on score
    low_anomalies: list[tuple[float, int, Shown]] = field(default_factory=list)  # min-heap on -score
    pro: tuple[np.ndarray, np.ndarray] | None = None  # (fpr, pro) up to PRO_FPR_LIMIT
    decision: Decision | None = None  # the bank's calibrated thresholds
    map_range: tuple[float, float] = (0.0, 1.0)


def _thin(x: np.ndarray, y: np.ndarray, n: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ~n points for plotting (first and last kept)."""
    if x.size <= n:
        return x, y
    idx = np.unique(np.r_[np.linspace(0, x.size - 1, n).astype(int), x.size - 1])
    return x[idx], y[idx]


class ReportCollector:
    """Gathers, class by class while evaluate streams, what :func:`write_report` needs.

    Memory per class: a few numbers per test image plus ``k`` normal and ``k``
    anomalous images (crop, map, mask), whatever the test set's size.
    """

    def __init__(self, k: int = 3) -> None:
        self.k = k
        self.classes: dict[str, ClassData] = {}
        self._tie = itertools.count()  # heap tie-breaker: arrays do not compare

    def add_batch(self, name: str, result: Any, samples: list[Any]) -> None:
        """One ScoredBatch (``scores`` [B], ``maps`` [B, S, S], ``rgb``, ``masks``) and its samples."""
        data = self.classes.setdefault(name, ClassData())
        for j, sample in enumerate(samples):
            score, label = float(result.scores[j]), int(sample.label)
            data.paths.append(str(sample.path))
            data.defects.append(str(sample.defect))
            data.labels.append(label)
            data.scores.append(score)
            heap, key = (data.high_normals, score) if label == 0 else (data.low_anomalies, -score)
            if len(heap) == self.k and key <= heap[0][0]:
                continue  # not among the k to show: skip the copies
            mask = None if result.masks is None else np.array(result.masks[j])
            shown = Shown(str(sample.path), str(sample.defect), label, score,
                          np.array(result.rgb[j]), result.maps[j].astype(np.float16), mask)
            item = (key, next(self._tie), shown)
            if len(heap) < self.k:
                heapq.heappush(heap, item)
            else:
                heapq.heapreplace(heap, item)

    def end_class(
        self, name: str, masks: np.ndarray, maps: np.ndarray, metadata: dict[str, Any], map_range: tuple[float, float]
    ) -> None:
        """Called once a class is scored: its masks/maps [N, S, S] (for the PRO curve), the bank's metadata."""
        data = self.classes.setdefault(name, ClassData())
        data.pro = _thin(*pro_curve(masks, maps))
        data.decision = Decision.from_metadata(metadata)
        data.map_range = map_range


# ---------------------------------------------------------------------------------------------- threshold
@dataclass(frozen=True)
class Threshold:
    """The operating point shown: value, where it comes from, and the confusion matrix at it."""

    value: float
    source: str  # "calibrated" | "f1_optimal" | "none"
    note: str
    tp: int
    fp: int
    fn: int
    tn: int


def threshold_for(data: ClassData) -> Threshold:
    """The calibrated image threshold when the bank has one, else the F1-optimal one on the test set."""
    labels, scores = np.array(data.labels) > 0, np.array(data.scores, dtype=np.float64)
    d = data.decision
    if d is not None:
        value, source, fa, floor = d.image_threshold, "calibrated", d.false_alarm_rate, d.attainable_false_alarm_rate
        note = "calibrated on normal images (bank metadata)" + (f", target false-alarm rate {fa:g}" if fa else "")
        note += f"; pixel threshold {d.pixel_threshold:.4g}"
        if floor is not None and fa is not None and floor > fa:
            note += (f"; {d.n_images} calibration images certify only 1/(n+1) = {100 * floor:.1f}% "
                     "(the threshold is their largest score): calibrate on more normal images")
        normal = ~labels
        warning = transfer_warning(d, int(is_ng(scores[normal], d.image_threshold).sum()), int(normal.sum()))
        note += f"; warning: {warning}" if warning else ""
    else:
        best = f1_optimal_threshold(labels, scores)
        value, source = (best["threshold"] if best else float("nan")), "f1_optimal"
        note = "F1-optimal on this test set: optimistic, chosen with the labels; calibrate before deployment"
    if math.isnan(value):
        return Threshold(value, "none", "undefined: the test set has a single class", 0, 0, 0, 0)
    m = decision_metrics(labels, scores, value)
    return Threshold(value, source, note, m["tp"], m["fp"], m["fn"], m["tn"])


# ---------------------------------------------------------------------------------------------- files
def _plot_curves(data: ClassData, path: Path, threshold: Threshold) -> None:
    """ROC (image level) and PRO (pixel level, FPR <= 0.3) side by side as one PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from sklearn.metrics import roc_curve  # noqa: PLC0415

    labels, scores = np.array(data.labels), np.array(data.scores)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.6, 3.2), dpi=90)
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax1.plot(fpr, tpr, color="#1f5fa8", lw=2)
        ax1.fill_between(fpr, tpr, step=None, alpha=0.12, color="#1f5fa8")
        if threshold.source != "none":
            pred = is_ng(scores, threshold.value)
            op = (pred[labels == 0].mean(), pred[labels == 1].mean())
            ax1.plot(*op, "o", color="#d1495b", ms=7, label=f"threshold {threshold.value:.3g}")
            ax1.legend(loc="lower right", fontsize=8, frameon=False)
    else:
        ax1.text(0.5, 0.5, "one class only", ha="center", va="center")
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


# ---------------------------------------------------------------------------------------------- html
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2733;
  background:#f4f6f9;margin:0}
header{background:#1d2b3a;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px;font-weight:600} header p{margin:4px 0 0;color:#b9c6d3;font-size:13px}
main{padding:20px 32px;max-width:1240px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:16px 20px;margin-bottom:18px}
h2{font-size:18px;margin:0 0 10px} h3{font-size:14px;margin:14px 0 6px;color:#445}
table{border-collapse:collapse} th,td{padding:5px 12px;text-align:right;border-bottom:1px solid #e5e9ef}
th{background:#eef2f6;font-weight:600} td:first-child,th:first-child{text-align:left}
tr.mean td{font-weight:600;border-top:2px solid #c5ced8}
.bar{display:inline-block;height:8px;border-radius:4px;background:#2a9d8f;vertical-align:middle;margin-left:6px}
.cm td{width:70px;text-align:center;font-size:15px} .cm th{text-align:center}
.cm .ok{background:#e3f4ea} .cm .bad{background:#fbe4e6}
.row{display:flex;gap:22px;flex-wrap:wrap;align-items:flex-start} .row>div{flex:1;min-width:300px}
.gallery{display:flex;gap:14px;flex-wrap:wrap} figure{margin:0;font-size:12px;color:#445}
figure img{display:block;height:124px;width:auto;border:1px solid #d7dde4;border-radius:4px}
.ng{color:#b3261e;font-weight:600} .okf{color:#1e6b3f;font-weight:600}
.note{color:#667;font-size:12px} .tag{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px}
.tag.cal{background:#e3f4ea;color:#1e6b3f} .tag.f1{background:#fff2d6;color:#8a5a00}
"""


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _cell(value: Any, text: str, bar: bool = False) -> str:
    extra = ""
    if bar and isinstance(value, float) and not math.isnan(value):
        extra = f'<span class="bar" style="width:{max(0.0, min(1.0, value)) * 60:.0f}px"></span>'
    return f'<td data-value="{html.escape(repr(value))}">{html.escape(text)}{extra}</td>'


def _table(report: dict[str, Any]) -> str:
    head = ("class", "image AUROC %", "pixel AUROC %", "AUPRO %", "K", "bank MB", "img/s")
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for name, r in [*report["classes"].items(), ("mean", report["mean"])]:
        cells = [
            f'<td><a href="#class-{html.escape(name)}">{html.escape(name)}</a></td>' if name != "mean"
            else "<td>mean</td>",
            _cell(r["image_auroc"], _pct(r["image_auroc"]), bar=True),
            _cell(r["pixel_auroc"], _pct(r["pixel_auroc"]), bar=True),
            _cell(r["aupro"], _pct(r["aupro"]), bar=True),
            _cell(r["n_centroids"], f"{r['n_centroids']:.0f}"),
            _cell(r["bank_bytes"], f"{r['bank_bytes'] / 1e6:.2f}"),
            _cell(r["images_per_s"], f"{r['images_per_s']:.1f}"),
        ]
        rows.append(f'<tr class="{"mean" if name == "mean" else "cls"}" data-class="{html.escape(name)}">'
                    + "".join(cells) + "</tr>")
    return '<table class="metrics">' + "".join(rows) + "</table>"


def _confusion(t: Threshold) -> str:
    if t.source == "none":
        return f'<p class="note">{html.escape(t.note)}</p>'
    tag = '<span class="tag cal">calibrated</span>' if t.source == "calibrated" else \
        '<span class="tag f1">F1-optimal (not calibrated)</span>'
    return (
        f"<p>Image threshold <b>{t.value:.4g}</b> {tag}<br><span class='note'>{html.escape(t.note)}; "
        "NG when score &gt; threshold.</span></p>"
        f'<table class="cm" data-threshold="{t.value!r}" data-source="{t.source}">'
        "<tr><th></th><th>predicted NG</th><th>predicted OK</th></tr>"
        f'<tr><th>defective</th><td class="ok" data-cm="tp">{t.tp}</td><td class="bad" data-cm="fn">{t.fn}</td></tr>'
        f'<tr><th>normal</th><td class="bad" data-cm="fp">{t.fp}</td><td class="ok" data-cm="tn">{t.tn}</td></tr>'
        "</table>"
        f"<p class='note'>false-alarm rate {_rate(t.fp, t.fp + t.tn)} of normal images &middot; "
        f"miss rate {_rate(t.fn, t.fn + t.tp)} of defective images</p>"
    )


def _rate(k: int, n: int) -> str:
    return "n/a" if n == 0 else f"{k}/{n} = {100 * k / n:.1f} %"


def _figures(items: list[dict[str, Any]], threshold: Threshold) -> str:
    if not items:
        return '<p class="note">none in this test set</p>'
    figs = []
    for it in items:
        flag = ""
        if threshold.source != "none":
            ng = bool(is_ng(it["score"], threshold.value))
            right = ng == bool(it["label"])
            flag = f' &rarr; <span class="{"okf" if right else "ng"}">{"NG" if ng else "OK"}</span>'

        label = html.escape(Path(it["path"]).parent.name + "/" + Path(it["path"]).name)
        figs.append(
            f'<figure><a href="{html.escape(it["src"])}"><img src="{html.escape(it["src"])}" alt="{label}"></a>'
            f"<figcaption>{label} &middot; score <b>{it['score']:.4g}</b>{flag}</figcaption></figure>"
        )
    return '<div class="gallery">' + "".join(figs) + "</div>"


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
        n_ng = int(np.sum(np.array(data.labels) > 0))
        sections.append(
            f'<section id="class-{html.escape(name)}" data-class="{html.escape(name)}">'
            f"<h2>{html.escape(name)}</h2>"
            f"<p class='note'>{len(data.labels)} test images ({n_ng} defective) &middot; "
            f"image AUROC {_pct(r.get('image_auroc'))} % &middot; AUPRO {_pct(r.get('aupro'))} % &middot; "
            f"K = {r.get('n_centroids', 0):.0f} centroids, radius {r.get('radius', float('nan')):.3g}</p>"
            f'<div class="row"><img src="{rel}/curves.png" alt="ROC and PRO curves of {html.escape(name)}" '
            f'width="684"><div><h3>Decision</h3>{_confusion(threshold)}</div></div>'
            "<h3>Highest-scoring normal images (false-alarm candidates)</h3>"
            f"{_figures(gallery['normals'], threshold)}"
            "<h3>Lowest-scoring defective images (miss candidates)</h3>"
            f"{_figures(gallery['anomalies'], threshold)}"
            "<p class='note'>Each: the input crop, the anomaly map over it (jet colour scale from 0 to 2 r; "
            "red = far from every normal patch), and for defective images the ground-truth mask. "
            "Click an image for full size.</p>"
            "</section>"
        )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017  (3.10 has no datetime.UTC)
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>ocbank evaluation report</title><style>{CSS}</style></head><body>"
        f"<header><h1>ocbank evaluation report</h1><p>{len(report['classes'])} classes &middot; "
        f"ocbank {html.escape(__version__)} &middot; {stamp} &middot; metrics: "
        "<a style='color:#9fd3ff' href='metrics.json'>metrics.json</a>, scores: "
        "<a style='color:#9fd3ff' href='scores.csv'>scores.csv</a></p></header><main>"
        "<section><h2>Per-class results</h2>"
        f"{_table(report)}"
        "<p class='note'>Image AUROC ranks raw image scores (max patch distance); pixel AUROC and AUPRO "
        "(FPR &le; 0.3) use the anomaly maps. K: centroids in the bank; img/s: end-to-end scoring rate.</p>"
        "</section>" + "".join(sections) + "</main></body></html>"
    )
    path = out / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- screenshot
def chromium() -> str | None:
    """The Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html_file: str | Path, png: str | Path, width: int = 1280, height: int = 2000) -> Path:
    """Render ``html_file`` with headless Chromium (no network, throwaway profile) to a PNG."""
    exe = chromium()
    if exe is None:
        from ..errors import DependencyError  # noqa: PLC0415

        msg = "no chromium executable on PATH, got None. Install it (apt-get install chromium) to render reports."
        raise DependencyError(msg)
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={png}", f"--window-size={width},{height}", Path(html_file).resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return png
