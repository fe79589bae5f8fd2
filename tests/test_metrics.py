"""Metrics against independent brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from ocbank.model import metrics


def brute_auroc(labels, scores) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), over all pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def flood_regions(masks) -> list[tuple[int, np.ndarray]]:
    """(image index, pixel coordinates [P, 2]) of each 8-connected region, by flood fill."""
    regions = []
    for i, m in enumerate(masks):
        seen = np.zeros_like(m, dtype=bool)
        for y, x in zip(*np.nonzero(m), strict=True):
            if seen[y, x]:
                continue
            stack, pix = [(y, x)], []
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                pix.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < m.shape[0] and 0 <= nx < m.shape[1] and m[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            regions.append((i, np.array(pix)))
    return regions


def brute_pro_points(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, with explicit per-region overlaps, from (0, 0)."""
    regions = flood_regions(masks)
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([pred[i][p[:, 0], p[:, 1]].mean() for i, p in regions]))
    return np.array(fprs), np.array(pros)


def brute_pro(masks, maps, fpr_limit=0.3) -> float:
    """Threshold sweep with explicit per-region overlaps (8-connectivity by flood fill)."""
    fprs, pros = brute_pro_points(masks, maps)
    grid = np.linspace(0, fpr_limit, 20001)
    return float(np.trapezoid(np.interp(grid, fprs, pros), grid) / fpr_limit)


def test_image_auroc_matches_sklearn_and_pairs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels * 0.8
    scores[:20] = scores[20:40]  # ties
    got = metrics.image_auroc(labels, scores)
    assert got == pytest.approx(roc_auc_score(labels, scores))
    assert got == pytest.approx(brute_auroc(labels, scores))


def test_pixel_auroc_matches_pairs():
    rng = np.random.default_rng(1)
    masks = (rng.random((3, 12, 12)) > 0.8).astype(np.uint8)
    maps = rng.random((3, 12, 12)) + masks * 0.5
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(brute_auroc(masks.ravel(), maps.ravel()))


def test_single_class_auroc_is_nan():
    assert np.isnan(metrics.image_auroc(np.zeros(5), np.arange(5.0)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force_sweep(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 20, 20), dtype=np.uint8)
    masks[0, 3:8, 3:9] = 1
    masks[0, 12:14, 15:19] = 1  # a second, small region in the same image
    masks[1, 5:6, 5:6] = 1
    masks[1, 6:7, 6:7] = 1  # diagonal neighbour: the same region under 8-connectivity
    masks[2, 10:18, 2:5] = 1
    maps = np.round(rng.random(masks.shape) + masks * rng.uniform(0.2, 0.8), 2)  # rounding makes ties
    expected = brute_pro(masks, maps)
    assert metrics.aupro(masks, maps) == pytest.approx(expected, abs=2e-4)


def test_aupro_counts_regions_equally_and_limits():
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, 0:5, 0:5] = 1  # large region, found
    masks[0, 8, 8] = 1  # one-pixel region, missed
    maps = np.zeros((1, 10, 10))
    maps[0, 0:5, 0:5] = 1.0
    # Curve points: (0, 0.5) at threshold 1 (one of two regions, whatever their sizes),
    # then (1, 1) at threshold 0; linear in between: mean of 0.5 + 0.5 x over [0, 0.3].
    assert metrics.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.575, abs=1e-9)
    perfect = masks.astype(float)
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(masks, maps, fpr_limit=0)
    assert np.isnan(metrics.aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 3), limit=st.sampled_from([0.05, 0.3, 1.0]))
def test_pro_curve_is_the_brute_force_sweep(seed, n, limit):
    """Every brute-force point below the limit is on the curve, and the curve ends at the limit's value."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 24, 24), bool)
    for m in masks:
        y, x = rng.integers(0, 18, 2)
        m[y: y + rng.integers(2, 6), x: x + rng.integers(2, 6)] = True
    maps = rng.random((n, 24, 24)).round(2) + masks * rng.uniform(0, 0.5)  # ties on purpose
    fpr, pro = metrics.pro_curve(masks, maps, fpr_limit=limit)
    want_f, want_p = brute_pro_points(masks, maps)
    keep = want_f <= limit
    assert fpr.size == int(keep.sum()) + int(want_f[keep].max() < limit)  # one point per threshold
    for f, p in zip(want_f[keep], want_p[keep], strict=True):
        assert np.any(np.isclose(fpr, f, rtol=0, atol=1e-12) & np.isclose(pro, p, rtol=0, atol=1e-12)), (f, p)
    assert fpr[-1] == pytest.approx(limit, abs=1e-12)
    assert pro[-1] == pytest.approx(np.interp(limit, want_f, want_p), abs=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert metrics.pro_curve(np.zeros((1, 4, 4)), np.ones((1, 4, 4)))[0].size == 0  # no region: no curve


def test_metric_notes_say_why_a_metric_is_undefined():
    assert metrics.image_metric_note(np.array([0, 1, 0])) is None
    assert metrics.image_metric_note(np.zeros(4)) == "no anomalous test image (only normal ones)"
    assert metrics.image_metric_note(np.ones(4)) == "no normal test image (only anomalous ones)"
    assert metrics.image_metric_note(np.zeros(0)) == "no test image could be scored"
    masks = np.zeros((2, 4, 4), np.uint8)
    assert metrics.pixel_metric_note(masks) == "no anomalous pixel in the masks"
    masks[1, 2, 2] = 1  # a 0/1 mask is anomalous where it is 1
    assert metrics.pixel_metric_note(masks) is None
    assert metrics.pixel_metric_note(np.full((1, 2, 2), 255, np.uint8)) == "no normal pixel in the masks"
    # A score or map value that is not finite has no rank: after the label rules, it is the reason.
    assert metrics.image_metric_note(np.array([0, 1, 0]), np.array([0.1, np.nan, np.inf])) == (
        "2 of 3 image scores are not finite (a failed computation)")
    assert metrics.image_metric_note(np.array([0, 1]), np.array([0.1, 0.2])) is None
    assert metrics.image_metric_note(np.zeros(2), np.array([np.nan, 1.0])) == "no anomalous test image (only normal ones)"
    masks = np.zeros((1, 2, 2), np.uint8)
    masks[0, 0, 0] = 1
    assert metrics.pixel_metric_note(masks, np.array([[[0.0, np.nan], [1.0, 2.0]]])) == (
        "some anomaly map values are not finite (a failed computation)")
    assert metrics.pixel_metric_note(masks, np.zeros((1, 2, 2))) is None
    # The notes agree with the metrics: defined exactly when no note is given.
    assert np.isnan(metrics.pixel_auroc(np.zeros((1, 3, 3)), np.ones((1, 3, 3))))


def test_shape_errors_are_ocbank_errors():
    from ocbank.errors import InputError

    with pytest.raises(InputError, match=r"\(1, 3, 3\) and \(1, 4, 4\)"):
        metrics.pixel_auroc(np.zeros((1, 3, 3)), np.zeros((1, 4, 4)))
    with pytest.raises(InputError, match="fpr_limit"):
        metrics.aupro(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)), fpr_limit=1.5)


# ---------------------------------------------------------------------- strict JSON
def test_write_json_is_strict_atomic_and_converts_numpy(tmp_path):
    import json

    from ocbank.jsonio import write_json

    path = tmp_path / "sub" / "m.json"
    write_json(path, {"a": np.float32(0.5), "n": np.int64(3), "v": np.arange(3), "none": None})
    assert json.loads(path.read_text()) == {"a": 0.5, "n": 3, "v": [0, 1, 2], "none": None}
    before = path.read_bytes()
    for bad in ({"x": float("nan")}, {"x": np.float64("inf")}, {"x": [1.0, -float("inf")]}):
        with pytest.raises(ValueError, match="JSON compliant"):
            write_json(path, bad)
    with pytest.raises(TypeError, match="object"):
        write_json(path, {"x": object()})
    assert path.read_bytes() == before  # a refused write leaves the old file whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]  # no temp files left
