"""OK/NG decisions: thresholds from normal images only, and how they do on labelled data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Decision:
    """OK/NG thresholds calibrated on normal images (stored in bank metadata under ``decision``)."""

    image_threshold: float  # an image is NG when its score > this
    pixel_threshold: float  # a pixel is NG when its map value > this
    false_alarm_rate: float  # the target share of normal images flagged NG
    n_images: int  # normal images the thresholds were set on
    source: str  # "holdout" (training images the bank never saw) or "folder" (--calibration)
    normalization: str = "score / image_threshold"  # 1.0 is the threshold; > 1 is NG
    # The lowest false-alarm rate n images can certify: 1 / (n + 1). Above the target, the
    # threshold is the largest calibration score and the target is not guaranteed.
    attainable_false_alarm_rate: float | None = None

    @property
    def target_met(self) -> bool:
        """Whether the calibration images were enough to certify the target rate."""
        return self.attainable_false_alarm_rate is None or self.attainable_false_alarm_rate <= self.false_alarm_rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def conservative_quantile(values: np.ndarray, false_alarm_rate: float) -> float:
    """The ceil((1 - a)(n + 1))-th smallest of n values (capped at the largest).

    A fresh normal value exceeds it with probability at most ``a`` when the values
    are exchangeable (the split-conformal bound); with few values it is the maximum.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    rank = int(np.ceil((1.0 - false_alarm_rate) * (v.size + 1)))
    return float(v[min(rank, v.size) - 1])


def decision_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion matrix, precision, recall and false-alarm rate of ``score > threshold`` (NG = positive).

    labels [N] (0 normal, 1 anomalous), scores [N]. A rate with an empty denominator is None.
    """
    y = np.asarray(labels).ravel() > 0
    pred = np.asarray(scores, dtype=np.float64).ravel() > threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "false_alarm_rate": ratio(fp, fp + tn),
    }


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any] | None:
    """The threshold t maximising F1 of ``score > t`` over the observed scores (None with one class only).

    Candidates are the midpoints between consecutive distinct scores and just below the lowest.
    """
    y = np.asarray(labels).ravel() > 0
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.all() or not y.any():
        return None
    u = np.unique(s)
    cands = np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2.0]
    best: tuple[float, float] | None = None
    for t in cands:
        pred = s > t
        tp = int((pred & y).sum())
        f1 = 2 * tp / (int(pred.sum()) + int(y.sum()))
        if best is None or f1 > best[0]:
            best = (f1, float(t))
    assert best is not None
    return {"f1": best[0], **decision_metrics(y, s, best[1])}
