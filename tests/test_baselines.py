"""PaDiM and SPADE (benchmarks/baselines.py) against plain-loop references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import mahalanobis

from benchmarks.baselines import Padim, PadimParams, Spade, SpadeParams
from ocbank.errors import ConfigError, InputError


def _grids(seed: int, n: int, h: int, w: int, c: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(1, h, w, c)) * 3.0  # a per-position pattern, as in real feature grids
    return (base + rng.normal(size=(n, h, w, c))).astype(np.float32)


def padim_reference(train: np.ndarray, test: np.ndarray, channels: np.ndarray, eps: float) -> np.ndarray:
    """Plain loops: per position, np.cov + eps*I, inverse, scipy's Mahalanobis distance."""
    n, h, w, _ = train.shape
    out = np.zeros((len(test), h, w))
    for i in range(h):
        for j in range(w):
            x = train[:, i, j, channels].astype(np.float64)
            cov = np.cov(x, rowvar=False) + eps * np.eye(len(channels))
            inv = np.linalg.inv(cov)
            mu = x.mean(axis=0)
            for t in range(len(test)):
                out[t, i, j] = mahalanobis(test[t, i, j, channels].astype(np.float64), mu, inv)
    return out


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 7), dims=st.integers(1, 9), chunk=st.integers(1, 7))
def test_padim_matches_plain_loops(seed, n, dims, chunk):
    train, test = _grids(seed, n, 3, 2, 12), _grids(seed + 1, 3, 3, 2, 12)
    model = Padim(PadimParams(dims=dims, eps=0.01, seed=seed, chunk=chunk)).fit(train)
    assert len(model.channels) == dims and len(set(model.channels.tolist())) == dims
    grid, image = model.score(test)
    assert image is None and grid.shape == (3, 3, 2)
    ref = padim_reference(train, test, model.channels, 0.01)
    np.testing.assert_allclose(grid, ref, rtol=2e-3, atol=1e-3)


def test_padim_channel_choice_is_seeded_and_scores_training_mean_zero():
    train = _grids(0, 5, 2, 2, 30)
    a, b, c = (Padim(PadimParams(dims=10, seed=s)).fit(train) for s in (3, 3, 4))
    assert a.channels.tolist() == b.channels.tolist() != c.channels.tolist()
    grid, _ = a.score(train.mean(axis=0, keepdims=True))
    np.testing.assert_allclose(grid, 0.0, atol=1e-3)  # the mean itself is at distance 0
    assert a.nbytes == 4 * (4 * 10 + 4 * 10 * 10)


def test_padim_rejects_bad_input():
    with pytest.raises(InputError, match="at least 2"):
        Padim().fit(_grids(0, 1, 2, 2, 8))
    with pytest.raises(InputError, match="grid"):
        Padim(PadimParams(dims=4)).fit(_grids(0, 3, 2, 2, 8)).score(_grids(1, 1, 3, 2, 8))
    with pytest.raises(ConfigError):
        Padim(PadimParams(eps=0.0))


def spade_reference(train: np.ndarray, test: np.ndarray, k: int, kappa: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops: pooled-feature kNN over images, then kappa-NN over the K images' patches."""
    n, h, w, c = train.shape
    pooled = [train[i].reshape(-1, c).astype(np.float64).mean(axis=0) for i in range(n)]
    grids, images = np.zeros((len(test), h, w)), np.zeros(len(test))
    for t in range(len(test)):
        q = test[t].reshape(-1, c).astype(np.float64).mean(axis=0)
        d = sorted((float(np.linalg.norm(q - p)), i) for i, p in enumerate(pooled))[: min(k, n)]
        images[t] = np.mean([x for x, _ in d])
        gallery = [train[i, a, b].astype(np.float64) for _, i in d for a in range(h) for b in range(w)]
        for a in range(h):
            for b in range(w):
                dist = sorted(float(np.linalg.norm(test[t, a, b] - g)) for g in gallery)
                grids[t, a, b] = np.mean(dist[:kappa])
    return grids, images


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), k=st.integers(1, 10), kappa=st.integers(1, 4))
def test_spade_matches_plain_loops(seed, n, k, kappa):
    train, test = _grids(seed, n, 2, 3, 10), _grids(seed + 7, 3, 2, 3, 10)
    grid, image = Spade(SpadeParams(k_images=k, kappa=kappa)).fit(train).score(test)
    ref_grid, ref_image = spade_reference(train, test, k, kappa)
    np.testing.assert_allclose(image, ref_image, rtol=1e-6)
    np.testing.assert_allclose(grid, ref_grid, rtol=1e-3, atol=1e-3)


def test_spade_uses_only_the_nearest_images():
    # Two groups of training images; a test image like group A must not be matched to group B's patches.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 2, 2, 6)).astype(np.float32)
    b = a + 100.0
    test = a[:1] + 0.01
    test[0, 0, 0] = b[0, 0, 0]  # one patch that only group B explains
    model = Spade(SpadeParams(k_images=3)).fit(np.concatenate([a, b]))
    grid, _ = model.score(test)
    assert grid[0, 0, 0] > 50  # far from every patch of the 3 nearest (group A) images
    full, _ = Spade(SpadeParams(k_images=6)).fit(np.concatenate([a, b])).score(test)
    assert full[0, 0, 0] < 1e-3  # with every image in the gallery it is matched exactly
    assert model.nbytes == 6 * 4 * 6 * 4 + 6 * 6 * 4


def test_spade_rejects_bad_input():
    with pytest.raises(ConfigError):
        Spade(SpadeParams(k_images=0))
    with pytest.raises(InputError):
        Spade().fit(np.zeros((3, 4)))
