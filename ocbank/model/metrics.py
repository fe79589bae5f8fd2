"""Image AUROC, pixel AUROC and AUPRO (the MVTec AD definition)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from ..errors import InputError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
PRO_FPR_LIMIT = 0.3  # AUPRO's integration limit (MVTec AD)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).ravel()
    if labels.size == 0 or np.unique(labels).size < 2:
        return float("nan")  # undefined with a single class
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """labels [N] (0 normal / 1 anomalous), scores [N] -> AUROC (nan if one class only)."""
    return _auroc(np.asarray(labels) > 0, scores)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """masks [N, H, W] binary, maps [N, H, W] -> pixel-level AUROC."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape:
        msg = f"masks and maps must have the same shape, got {masks.shape} and {maps.shape}. Pass one map per mask."
        raise InputError(msg)
    return _auroc(masks > 0, maps)


def pro_curve(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT
) -> tuple[np.ndarray, np.ndarray]:
    """masks [N, H, W], maps [N, H, W] -> the PRO curve (fpr, pro), float64 [M], cut at ``fpr_limit``.

    Each 8-connected region of each ground-truth mask contributes its overlap
    (fraction of its pixels above the threshold); PRO is their mean over all
    regions. The FPR is counted over the normal pixels of all images. Every
    distinct threshold is a curve point (an exact sweep, by sorting), starting
    at (0, 0); the last point is the curve's value at ``fpr_limit`` when the
    curve reaches it. Empty arrays when there is no defect region or no normal pixel.
    """
    masks, maps = np.asarray(masks) > 0, np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        msg = f"masks and maps must have the same shape, got {masks.shape} and {maps.shape}. Pass one map per mask."
        raise InputError(msg)
    if not 0 < fpr_limit <= 1:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit!r}. Use e.g. 0.3."
        raise InputError(msg)
    pro_weight = np.zeros(maps.shape, dtype=np.float64)
    n_regions = 0
    for i in range(masks.shape[0]):
        labels, n = ndimage.label(masks[i], structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())
        region_weight = np.zeros_like(sizes, dtype=np.float64)
        region_weight[1:] = 1.0 / sizes[1:]
        pro_weight[i] = region_weight[labels]
        n_regions += n
    normal = ~masks
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(normal.ravel()[order]) / n_normal
    pro = np.cumsum(pro_weight.ravel()[order]) / n_regions
    # Keep the last point of each run of equal scores: one point per threshold.
    last = np.r_[scores[1:] != scores[:-1], True]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    stop = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:stop], pro[:stop]
    if stop < fpr.size and x[-1] < fpr_limit:  # interpolate the curve at the limit
        x1, x0, y1, y0 = fpr[stop], fpr[stop - 1], pro[stop], pro[stop - 1]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return x, y


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under :func:`pro_curve` up to ``fpr_limit``, divided by it (nan when the curve is undefined)."""
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    if fpr.size == 0:
        return float("nan")
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def image_metric_note(labels: np.ndarray, scores: np.ndarray | None = None) -> str | None:
    """Why image AUROC is undefined for labels [N] (0 normal / 1 anomalous) and scores [N], or None if it is defined.

    A NaN or infinite score is a computation that failed: it has no rank.
    """
    labels = np.asarray(labels).ravel() > 0
    if labels.size == 0:
        return "no test image could be scored"
    if labels.all():
        return "no normal test image (only anomalous ones)"
    if not labels.any():
        return "no anomalous test image (only normal ones)"
    if scores is not None and (n_bad := int((~np.isfinite(np.asarray(scores))).sum())):
        return f"{n_bad} of {labels.size} image scores are not finite (a failed computation)"
    return None


def pixel_metric_note(masks: np.ndarray, maps: np.ndarray | None = None) -> str | None:
    """Why pixel AUROC and AUPRO are undefined for masks and maps [N, H, W], or None if they are defined."""
    masks = np.asarray(masks) > 0
    if masks.size == 0:
        return "no test image could be scored"
    if not masks.any():
        return "no anomalous pixel in the masks"
    if masks.all():
        return "no normal pixel in the masks"
    if maps is not None and not np.isfinite(maps).all():
        return "some anomaly map values are not finite (a failed computation)"
    return None
