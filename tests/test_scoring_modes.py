"""The image-score modes of ocbank.model.scoring, and the research edge exemplars, against plain-loop references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import uniform_filter

from benchmarks import exemplars
from ocbank.errors import ConfigError, InputError
from ocbank.model import scoring as sm


def local_mean_loops(grid: np.ndarray, window: int) -> np.ndarray:
    """Plain loops: the mean of the window around each cell, indices clamped to the grid."""
    b, h, w = grid.shape
    p = window // 2
    out = np.zeros((b, h, w))
    for k in range(b):
        for i in range(h):
            for j in range(w):
                vals = [float(grid[k, min(max(a, 0), h - 1), min(max(c, 0), w - 1)])
                        for a in range(i - p, i + p + 1) for c in range(j - p, j + p + 1)]
                out[k, i, j] = sum(vals) / len(vals)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7),
       window=st.sampled_from([1, 3, 5, 7]))
def test_local_mean_matches_loops_and_scipy(seed, b, h, w, window):
    grid = np.random.default_rng(seed).gamma(2.0, 5.0, size=(b, h, w)).astype(np.float32)
    ref = local_mean_loops(grid, window)
    np.testing.assert_allclose(sm.local_mean(grid, window), ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sm.local_mean(grid, window),
                               uniform_filter(grid.astype(np.float64), size=(1, window, window), mode="nearest"),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sm.local_mean_max(grid, window), ref.reshape(b, -1).max(axis=1), rtol=1e-9)


def local_gauss_loops(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Plain loops: normalised 2-D Gaussian weights over offsets within 4 sigma, indices clamped."""
    b, h, w = grid.shape
    rad = int(4.0 * sigma + 0.5)
    k1 = [np.exp(-0.5 * (o / sigma) ** 2) for o in range(-rad, rad + 1)]
    k1 = [x / sum(k1) for x in k1]
    out = np.zeros((b, h, w))
    for k in range(b):
        for i in range(h):
            for j in range(w):
                out[k, i, j] = sum(k1[a + rad] * k1[c + rad] * float(grid[k, min(max(i + a, 0), h - 1),
                                                                          min(max(j + c, 0), w - 1)])
                                   for a in range(-rad, rad + 1) for c in range(-rad, rad + 1))
    return out


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 8), w=st.integers(1, 8), sigma=st.sampled_from([0.5, 1.0, 1.5]))
def test_local_gauss_matches_loops(seed, h, w, sigma):
    grid = np.random.default_rng(seed).gamma(2.0, 5.0, size=(2, h, w))
    ref = local_gauss_loops(grid, sigma)
    np.testing.assert_allclose(sm.local_gauss(grid, sigma), ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sm.image_scores(grid, "local_gauss", sigma=sigma), ref.reshape(2, -1).max(axis=1),
                               rtol=1e-9)


def test_local_mean_prefers_a_blob_over_a_single_spike():
    # One image has a lone high patch (approximation noise), the other a smaller 3x3 blob (a defect):
    # the plain max ranks the spike first, the 3x3 mean ranks the blob first.
    grid = np.zeros((2, 6, 6))
    grid[0, 2, 2] = 9.0
    grid[1, 1:4, 1:4] = 5.0
    assert np.argmax(sm.image_scores(grid, "nn")) == 0
    assert np.argmax(sm.image_scores(grid, "local_mean", window=3)) == 1
    assert sm.image_scores(grid, "local_mean", 3)[1] == pytest.approx(5.0)
    assert sm.image_scores(grid, "local_mean", 3)[0] == pytest.approx(1.0)
    assert np.argmax(sm.image_scores(grid, "local_gauss", sigma=1.0)) == 1


def test_modes_reject_bad_arguments():
    with pytest.raises(ConfigError, match="odd"):
        sm.local_mean(np.zeros((1, 3, 3)), 2)
    with pytest.raises(ConfigError, match="mode"):
        sm.image_scores(np.zeros((1, 3, 3)), "median")
    with pytest.raises(ConfigError, match="sigma"):
        sm.local_gauss(np.zeros((1, 3, 3)), 0.0)
    with pytest.raises(InputError, match=r"\[B, h, w\]"):
        sm.image_scores(np.zeros((3, 3)))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), k=st.integers(1, 6), frac=st.floats(0.0, 1.0))
def test_edge_exemplars_are_the_worst_represented_patches(seed, n, k, frac):
    rng = np.random.default_rng(seed)
    patches = rng.integers(-3, 4, size=(n, 5)).astype(np.float32)  # integer grid: exact distances, real ties
    means = patches[rng.choice(n, size=min(k, n), replace=False)]
    # brute force: residual of each patch to its nearest mean, ranked by (-residual, index)
    resid = [min(float(np.sum((p.astype(np.float64) - q) ** 2)) ** 0.5 for q in means) for p in patches]
    idx = exemplars.edge_exemplars(np.array(resid), frac)
    ranked = sorted(range(n), key=lambda i: (-resid[i], i))
    e = min(int(np.ceil(frac * n)), sum(r > 0 for r in resid))
    assert idx.tolist() == sorted(ranked[:e])
    assert all(resid[i] > 0 for i in idx)  # the centroids' own patches are never duplicated


def test_with_exemplars_takes_the_nearer_and_checks_shapes():
    a, b = np.array([3.0, 1.0, 5.0]), np.array([2.0, 4.0, 5.0])
    assert exemplars.with_exemplars(a, b).tolist() == [2.0, 1.0, 5.0]
    assert exemplars.with_exemplars(a, None) is a
    with pytest.raises(InputError):
        exemplars.with_exemplars(a, b[:2])
    with pytest.raises(ConfigError, match="fraction"):
        exemplars.edge_exemplars(np.zeros(3), 1.5)
    with pytest.raises(InputError):
        exemplars.edge_exemplars(np.array([1.0, np.nan]), 0.5)


def _no_backbone():
    """What AnomalyModel takes from an extractor; score_features never runs it."""
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(stem=torch.nn.Identity(), layer2=torch.nn.Identity(), layer3=torch.nn.Identity(), pool="none")


@pytest.mark.parametrize("mode", sm.MODES)
def test_anomaly_model_scores_and_maps_with_either_search(mode):
    """AnomalyModel's score/map step on the bank's search and on the exportable GEMM, against scipy on the exact 1-NN grid."""
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    from ocbank.engine import ClusterBank
    from ocbank.model.module import AnomalyModel, BankNearest, MatmulNearest

    rng = np.random.default_rng(3)
    means = (rng.standard_normal((30, 16)) * 3).astype(np.float32)
    feats = (means[rng.integers(0, 30, (2, 6, 6))] + rng.standard_normal((2, 6, 6, 16))).astype(np.float32)
    feats[1, 2:5, 1:4] += 4.0  # a blob far from the bank
    bank = ClusterBank(16, 0.5)  # centroids ~17 apart: each mean stays its own centroid
    bank.add(means)
    assert len(bank) == 30
    grid = np.sqrt(((feats[..., None, :].astype(np.float64) - means) ** 2).sum(-1)).min(-1)  # [2, 6, 6]
    smoothed = {"nn": grid, "local_mean": uniform_filter(grid, size=(1, 3, 3), mode="nearest"),
                "local_gauss": gaussian_filter(grid, sigma=(0, 1.0, 1.0), mode="nearest", truncate=4.0)}[mode]
    want_scores = smoothed.reshape(2, -1).max(axis=1)
    up = F.interpolate(torch.from_numpy(grid)[:, None], size=(48, 48), mode="bilinear", align_corners=False)[:, 0]
    want_maps = gaussian_filter(up.numpy(), sigma=(0, 2.0, 2.0), mode="reflect", truncate=4.0)
    span = float(np.ptp(want_maps))
    for nearest in (MatmulNearest(means), BankNearest(bank)):
        model = AnomalyModel(_no_backbone(), nearest, sm.MapSpec(48, 2.0), score=sm.GridScore(mode))
        with torch.inference_mode():
            scores, maps = model.score_features(torch.from_numpy(feats))
        assert scores.dtype == maps.dtype == torch.float32 and maps.shape == (2, 48, 48)
        np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, err_msg=type(nearest).__name__)
        np.testing.assert_allclose(maps.numpy(), want_maps, rtol=0, atol=1e-5 * span, err_msg=type(nearest).__name__)


def test_detector_scorer_follows_its_bank_and_scoring_settings():
    """Detector.predict's AnomalyModel is built once, searches the live bank, and is rebuilt when either changes."""
    import dataclasses

    from ocbank import Detector
    from ocbank.engine import ClusterBank
    from ocbank.model.builder import FittedBank
    from ocbank.model.module import BankNearest
    from ocbank.model.radius import RadiusStats

    det = Detector(weights="none", image_size=64, radius=1.0, extractor=_no_backbone())
    first = ClusterBank(1536, 1.0)
    first.add(np.ones((1, 1536), np.float32))
    det.use_fitted(FittedBank(first, RadiusStats(1.0)))
    scorer = det.scorer
    assert det.scorer is scorer and isinstance(scorer.nearest, BankNearest) and scorer.nearest.bank is first
    assert scorer.score.mode == "nn" and scorer.spec == sm.MapSpec(64, det.config.scoring.sigma)
    det.config = dataclasses.replace(det.config, scoring=dataclasses.replace(det.config.scoring, mode="local_mean"))
    assert det.scorer is not scorer and det.scorer.score.mode == "local_mean"
    second = ClusterBank(1536, 1.0)
    second.add(np.zeros((1, 1536), np.float32))
    det.use_fitted(FittedBank(second, RadiusStats(1.0)))
    assert det.scorer.nearest.bank is second
