"""Anomaly maps, image scores and the radius rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from ocbank.errors import ConfigError
from ocbank.model.radius import nearest_other_distances, radius_statistics
from ocbank.model.scoring import anomaly_maps, blur_maps, image_scores


def test_image_score_is_grid_max():
    grid = np.random.default_rng(0).random((3, 7, 7)).astype(np.float32)
    np.testing.assert_array_equal(image_scores(grid), grid.max(axis=(1, 2)))


def test_maps_are_bilinear_upsample_then_gaussian_sigma_4():
    grid = np.zeros((1, 8, 8), dtype=np.float32)
    grid[0, 2, 5] = 10.0
    maps = anomaly_maps(grid, 64, sigma=4.0)
    assert maps.shape == (1, 64, 64) and maps.dtype == np.float32
    up = F.interpolate(torch.from_numpy(grid)[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(maps[0], gaussian_filter(up[0, 0].numpy(), sigma=4.0), rtol=1e-5, atol=1e-6)
    y, x = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert abs(y - 2.5 * 8) <= 2 and abs(x - 5.5 * 8) <= 2  # the peak stays where the patch was
    assert np.allclose(anomaly_maps(grid, 64, sigma=0)[0], up[0, 0].numpy())


def test_nearest_other_distance_brute_force_with_duplicates():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    x[10] = x[11]  # an exact duplicate: its nearest other is at distance 0
    d = nearest_other_distances(x)
    full = np.sqrt(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(d, full.min(1), rtol=1e-3, atol=1e-3)
    assert d[10] == pytest.approx(0.0, abs=1e-3)


def test_radius_statistics_percentiles():
    x = np.random.default_rng(2).normal(size=(500, 8)).astype(np.float32)
    stats = radius_statistics(x)
    d = nearest_other_distances(x)
    assert stats["p99"] == pytest.approx(np.percentile(d, 99))
    assert stats["suggested"] == stats["p99"] and stats["p50"] < stats["p90"] < stats["p95"] < stats["p99"]
    with pytest.raises(ValueError, match="at least 2"):
        radius_statistics(x[:1])


def test_synthetic_dataset_cli(tmp_path):
    from ocbank.synthetic import main

    main(["--out", str(tmp_path), "--n-train", "2", "--n-good-test", "1", "--n-defect-test", "1"])
    assert len(list((tmp_path / "weave" / "train" / "good").glob("*.png"))) == 2
    assert len(list((tmp_path / "dots" / "ground_truth" / "blob").glob("*_mask.png"))) == 1


@settings(max_examples=25, deadline=None)
@given(
    side=st.integers(min_value=1, max_value=80),
    width=st.integers(min_value=1, max_value=80),
    sigma=st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.7, 2.0, 4.0, 7.5]),
    seed=st.integers(0, 2**16),
)
def test_blur_matches_scipy_gaussian_filter(side, width, sigma, seed):
    """The torch blur equals scipy's (truncate 4, half-sample 'reflect') to 1e-6 of the map's range.

    Sides from 1 px: kernel radii beyond the map's side, where scipy reflects repeatedly, are included.
    """
    rng = np.random.default_rng(seed)
    maps = (rng.standard_normal((2, side, width)) * rng.uniform(0.1, 100)).astype(np.float32)
    got = blur_maps(maps, sigma)
    want = np.stack([gaussian_filter(m.astype(np.float64), sigma) for m in maps])
    scale = max(float(np.ptp(maps)), 1e-12)
    assert got.shape == maps.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6 * scale
    if sigma == 0:
        np.testing.assert_array_equal(got, maps)


def test_blur_border_is_half_sample_symmetric_not_torch_reflect():
    """A step at the border separates scipy's 'reflect' (edge repeated) from F.pad's (edge not repeated)."""
    m = np.zeros((1, 40, 40), np.float32)
    m[0, :, 0] = 1.0
    got = blur_maps(m, 4.0)
    np.testing.assert_allclose(got[0], gaussian_filter(m[0].astype(np.float64), 4.0), rtol=0, atol=1e-7)
    padded = F.pad(torch.from_numpy(m)[None], (16, 16, 16, 16), mode="reflect")[0, 0].numpy()
    torch_reflect = gaussian_filter(padded.astype(np.float64), 4.0, mode="constant")[16:-16, 16:-16]
    assert np.abs(got[0] - torch_reflect).max() > 1e-3  # the test can tell the two borders apart


def test_blur_refuses_a_bad_sigma():
    for sigma in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="scoring.sigma"):
            blur_maps(np.ones((1, 8, 8), np.float32), sigma)
