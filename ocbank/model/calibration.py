"""OK/NG decisions: thresholds from normal images only, and how they do on labelled data."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from numbers import Real
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)


def is_ng(scores: Any, image_threshold: float) -> Any:
    """The OK/NG rule, written once: an image is NG when its score > the threshold (strictly).

    ``scores``: a number, or a numpy array or torch tensor of any shape; the comparison runs
    in their dtype (float32 scores compare as float32, in numpy, torch and the exported graph).
    A NaN score is NG: the rule fails safe, so an image is OK only when its score is known to
    be at or below the threshold (a broken computation must never pass a part).
    """
    at_most = scores <= image_threshold
    return (not at_most) if isinstance(at_most, bool) else ~at_most


@dataclass(frozen=True)
class Verdict:
    """What :meth:`Decision.apply` returns, numpy or torch like its inputs."""

    ng: Any  # bool [N]: score > image_threshold
    normalized: Any  # [N] score / image_threshold: rank-preserving, 1.0 at the threshold, > 1 is NG
    mask: Any | None  # bool [N, S, S]: map > pixel_threshold (None when no maps were given)


@dataclass(frozen=True)
class Decision:
    """OK/NG thresholds calibrated on normal images (stored in bank metadata under ``decision``).

    The one type for thresholds: the Detector, the exported graph (:mod:`ocbank.model.module`),
    predict and the report apply it. Only the two thresholds are needed to apply it; the rest
    says how it was calibrated.
    """

    image_threshold: float  # an image is NG when its score > this
    pixel_threshold: float  # a pixel is NG when its map value > this
    false_alarm_rate: float | None = None  # the target share of normal images flagged NG
    n_images: int | None = None  # normal images the thresholds were set on
    source: str | None = None  # "holdout" (training images the bank never saw) or "folder" (--calibration)
    normalization: str = "score / image_threshold"  # 1.0 is the threshold; > 1 is NG
    # The lowest false-alarm rate n images can certify: 1 / (n + 1). Above the target, the
    # threshold is the largest calibration score and the target is not guaranteed.
    attainable_false_alarm_rate: float | None = None

    def __post_init__(self) -> None:
        for name in ("image_threshold", "pixel_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
                msg = f"decision.{name} must be a finite number > 0, got {value!r}. Recalibrate the bank's thresholds."
                raise ConfigError(msg)
            object.__setattr__(self, name, float(value))  # numpy scalars too: a plain float, as JSON stores it

    @property
    def target_met(self) -> bool:
        """Whether the calibration images were enough to certify the target rate."""
        if self.attainable_false_alarm_rate is None or self.false_alarm_rate is None:
            return True
        return self.attainable_false_alarm_rate <= self.false_alarm_rate

    def apply(self, scores: Any, maps: Any = None) -> Verdict:
        """scores [N] (and maps [N, S, S]), numpy or torch -> :class:`Verdict` in the same library.

        NG when score > image_threshold (:func:`is_ng`); a defect pixel when map > pixel_threshold
        (the same rule: a NaN pixel is a defect pixel).
        """
        mask = None if maps is None else is_ng(maps, self.pixel_threshold)
        return Verdict(is_ng(scores, self.image_threshold), scores / self.image_threshold, mask)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (None means the calibration did not say), as a bank file stores them."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Decision:
        """:meth:`to_dict`'s dict (a bank's ``decision`` block) -> Decision; ConfigError when it lacks a threshold."""
        try:
            return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        except (AttributeError, KeyError, TypeError) as exc:
            msg = f"the bank's decision block lacks image/pixel thresholds, got {d!r}. Recalibrate the bank."
            raise ConfigError(msg) from exc


def conformal_rank(n: int, false_alarm_rate: float) -> int:
    """Which of n sorted calibration values is the threshold: ceil((1 - a)(n + 1)), capped at n."""
    return min(int(np.ceil((1.0 - false_alarm_rate) * (n + 1))), n)


def conservative_quantile(values: np.ndarray, false_alarm_rate: float) -> float:
    """The ceil((1 - a)(n + 1))-th smallest of n values (capped at the largest).

    A fresh normal value exceeds it with probability at most ``a`` when the values
    are exchangeable (the split-conformal bound); with few values it is the maximum.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    return float(v[conformal_rank(v.size, false_alarm_rate) - 1])


# A warning that calibration does not transfer is wrong this rarely when the calibration and
# test images do come from the same population: rare enough to act on when it appears.
TRANSFER_SIGNIFICANCE = 1e-3


def calibrate_decision(scores: np.ndarray, maps: np.ndarray, false_alarm_rate: float, source: str) -> Decision:
    """OK/NG thresholds from normal images the bank never saw: their scores [n] and maps [n, S, S].

    The image threshold is the empirical (1 - false_alarm_rate) quantile of the scores (the
    conservative order statistic, :func:`conservative_quantile`); the pixel threshold is the same
    quantile of the per-image maxima of the maps, so that about the same share of normal images
    shows any NG pixel.
    """
    n = len(scores)
    image_t = conservative_quantile(scores, false_alarm_rate)
    pixel_t = conservative_quantile(maps.reshape(n, -1).max(axis=1), false_alarm_rate)
    if not (image_t > 0 and pixel_t > 0):
        # Exact distances: an image whose every patch is a centroid of the bank scores 0.
        msg = (
            f"the calibration images score at most {float(scores.max()):.4g}, so no threshold above 0 "
            "can be set: the bank holds their patches (they are its training images). "
            "Calibrate on normal images the bank never saw."
        )
        raise DataError(msg)
    decision = Decision(float(image_t), float(pixel_t), false_alarm_rate, n, source, attainable_false_alarm_rate=1 / (n + 1))
    if not decision.target_met:
        log.warning(
            "calibrated on %d normal image(s): the threshold is their largest score, which certifies a "
            "false-alarm rate of 1/(n+1) = %.1f%%, not the %.1f%% asked for. Give at least %d normal images "
            "(--calibration DIR or a larger decision.holdout) for that target.",
            n, 100 / (n + 1), 100 * false_alarm_rate, int(np.ceil(1 / false_alarm_rate)) - 1,
        )
    return decision


def transfer_p_value(false_alarms: int, n_normal: int, false_alarm_rate: float, n_calibration: int) -> float:
    """The chance of at least ``false_alarms`` of ``n_normal`` normal test images above a threshold
    calibrated on ``n_calibration`` normal images from the same population.

    Exact for continuous scores: the r-th smallest of n calibration scores (r from
    :func:`conformal_rank`) is exceeded by a fresh image with probability Beta(n + 1 - r, r);
    the number of false alarms among m images is then beta-binomial(m, n + 1 - r, r). This
    accounts for both the calibration count (few images: a wide spread) and the test count.
    """
    from scipy.stats import betabinom  # noqa: PLC0415  (scipy.stats is slow to import; only evaluate needs it)

    r = conformal_rank(n_calibration, false_alarm_rate)
    return float(betabinom.sf(false_alarms - 1, n_normal, n_calibration + 1 - r, r))


def transfer_warning(decision: Decision, false_alarms: int, n_normal: int) -> str | None:
    """One line when normal test images raise far more false alarms than the calibration explains, else None."""
    a, n = decision.false_alarm_rate, decision.n_images
    if a is None or not n or not n_normal:
        return None
    p = transfer_p_value(false_alarms, n_normal, a, n)
    if p >= TRANSFER_SIGNIFICANCE:
        return None
    return (
        f"the calibrated threshold flagged {false_alarms} of {n_normal} normal test images "
        f"({100 * false_alarms / n_normal:.0f}%) against a {100 * a:g}% target, far more than {n} calibration "
        f"images ({decision.source or 'unknown source'}) explain (p = {p:.1g}): they do not look like these images. "
        "Calibrate with --calibration on normal images from the line."
    )


def decision_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion matrix, precision, recall and false-alarm rate of ``score > threshold`` (NG = positive).

    labels [N] (0 normal, 1 anomalous), scores [N]. A rate with an empty denominator is None.
    """
    y = np.asarray(labels).ravel() > 0
    pred = is_ng(np.asarray(scores, dtype=np.float64).ravel(), threshold)
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
    """The threshold t maximising F1 of ``score > t`` over the observed scores (None with one class
    only, or when a score is NaN or infinite: such a score has no rank).

    Candidates are the midpoints between consecutive distinct scores and just below the lowest.
    """
    y = np.asarray(labels).ravel() > 0
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.all() or not y.any() or not np.isfinite(s).all():
        return None
    u = np.unique(s)
    cands = np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2.0]
    best: tuple[float, float] | None = None
    for t in cands:
        pred = is_ng(s, t)
        tp = int((pred & y).sum())
        f1 = 2 * tp / (int(pred.sum()) + int(y.sum()))
        if best is None or f1 > best[0]:
            best = (f1, float(t))
    assert best is not None
    return {"f1": best[0], **decision_metrics(y, s, best[1])}
