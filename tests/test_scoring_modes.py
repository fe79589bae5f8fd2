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
