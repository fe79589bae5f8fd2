"""What the evaluation report shows, collected while ``evaluate`` streams (the data half).

:class:`ReportCollector` gathers per-image scores, labels and paths, a few overlays
(bounded heaps, k per class) and the PRO curve, computed while evaluate holds a class's
maps; :func:`threshold_for` chooses the operating point shown. Rendering (curves, gallery
PNGs and ``report.html`` from its template) is :mod:`ocbank.jobs.report_html`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..model.calibration import Decision, decision_metrics, f1_optimal_threshold, transfer_warning
from ..model.metrics import image_metric_note, pro_curve

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
    pro: tuple[np.ndarray, np.ndarray] | None = None  # (fpr, pro) up to metrics.PRO_FPR_LIMIT
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
        self, name: str, masks: np.ndarray, maps: np.ndarray, decision: Decision | None, map_range: tuple[float, float]
    ) -> None:
        """Called once a class is scored: its masks/maps [N, S, S] (for the PRO curve), the bank's decision."""
        data = self.classes.setdefault(name, ClassData())
        data.pro = _thin(*pro_curve(masks, maps))
        data.decision = decision
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
    else:
        best = f1_optimal_threshold(labels, scores)
        value, source = (best["threshold"] if best else float("nan")), "f1_optimal"
        note = "F1-optimal on this test set: optimistic, chosen with the labels; calibrate before deployment"
    if math.isnan(value):
        return Threshold(value, "none", f"undefined: {image_metric_note(labels, scores)}", 0, 0, 0, 0)
    m = decision_metrics(labels, scores, value)
    if d is not None and (warning := transfer_warning(d, m["fp"], m["fp"] + m["tn"])):  # as evaluate counts it
        note += f"; warning: {warning}"
    return Threshold(value, source, note, m["tp"], m["fp"], m["fn"], m["tn"])
