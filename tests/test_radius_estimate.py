"""The linear-cost radius rule against the exact (all-pairs) rule, computed independently with scipy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist
from scipy.stats import binom

from ocbank.errors import InputError, InputTypeError
from ocbank.model import radius as radius_mod
from ocbank.model.radius import RadiusEstimate, estimate_radius, quantile_interval, radius_statistics

from .conftest import clustered


def brute_nearest_other(x: np.ndarray) -> np.ndarray:
    """[n] float64 nearest-other distances by plain all-pairs (the reference)."""
    d = cdist(x.astype(np.float64), x.astype(np.float64))
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def _heavy_tail(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3000, 12)) * rng.pareto(3.0, (3000, 1))  # a few far-out patches
    return x.astype(np.float32)


def _with_duplicates(seed: int) -> np.ndarray:
    base = clustered(1500, 16, 10, 3.0, 0.6, seed)
    rng = np.random.default_rng(seed)
    return base[rng.integers(0, len(base), 3000)]  # ~ a third of the rows have an exact copy


FEATURE_SETS = {
    "clustered": lambda: clustered(3000, 24, 15, 3.0, 0.7, 1),
    "one_gaussian": lambda: np.random.default_rng(2).standard_normal((3000, 16)).astype(np.float32),
    "heavy_tail": lambda: _heavy_tail(3),
    "duplicates": lambda: _with_duplicates(4),
}


@pytest.mark.parametrize("name", sorted(FEATURE_SETS))
def test_exact_p99_lies_in_the_interval_for_most_seeds(name):
    x = FEATURE_SETS[name]()
    exact = float(np.percentile(brute_nearest_other(x), 99))
    inside = []
    for seed in range(40):
        est = estimate_radius(x, max_queries=600, seed=seed)
        assert not est.exact and est.n_queries == 600 and est.n_patches == len(x)
        assert est.ci_low <= est.radius <= est.ci_high
        inside.append(est.ci_low <= exact <= est.ci_high)
    assert np.mean(inside) >= 0.90, (name, np.mean(inside))
    # The interval is informative, not (-inf, inf): 600 queries bound p99 on both sides.
    assert np.isfinite(est.ci_low) and np.isfinite(est.ci_high) and est.ci_high > est.ci_low


@pytest.mark.parametrize("name", sorted(FEATURE_SETS))
def test_all_queries_is_the_exact_rule(name):
    x = FEATURE_SETS[name]()[:1200]
    ref = brute_nearest_other(x)
    est = estimate_radius(x, max_queries=len(x))
    assert est.exact and est.n_queries == len(x) and est.ci_low == est.ci_high == est.radius
    assert est.radius == pytest.approx(np.percentile(ref, 99), rel=1e-4, abs=1e-4)
    for p in radius_mod.PERCENTILES:
        assert est.percentiles[f"p{p}"] == pytest.approx(np.percentile(ref, p), rel=1e-4, abs=1e-4)
    stats = radius_statistics(x)
    assert stats["suggested"] == est.radius and stats["n_patches"] == len(x) and stats["exact"]


def test_duplicates_have_distance_zero_across_database_chunks(monkeypatch):
    x = clustered(300, 8, 5, 3.0, 0.5, 7)
    x[250] = x[3]  # copies far apart land in different database chunks
    x[120] = x[121]
    monkeypatch.setattr(radius_mod, "DATABASE_CHUNK_ROWS", 64)
    d = radius_mod.nearest_other_distances(x)
    np.testing.assert_allclose(d, brute_nearest_other(x), rtol=1e-3, atol=2e-3)
    assert d[3] == d[250] == pytest.approx(0.0, abs=2e-3) and d[120] == pytest.approx(0.0, abs=2e-3)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 90),
    chunk=st.integers(1, 40),
    n_dup=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_nearest_other_matches_brute_force_for_any_chunking(n, chunk, n_dup, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, size=(n, 3)).astype(np.float32)  # small integer grid: ties and duplicates abound
    for _ in range(n_dup):
        x[rng.integers(n)] = x[rng.integers(n)]
    old = radius_mod.DATABASE_CHUNK_ROWS
    radius_mod.DATABASE_CHUNK_ROWS = chunk
    try:
        d = radius_mod.nearest_other_distances(x)
    finally:
        radius_mod.DATABASE_CHUNK_ROWS = old
    np.testing.assert_allclose(d, brute_nearest_other(x), rtol=1e-5, atol=1e-3)


def test_seeds_are_reproducible_and_differ():
    x = FEATURE_SETS["clustered"]()
    a, b = estimate_radius(x, max_queries=500, seed=11), estimate_radius(x, max_queries=500, seed=11)
    assert a == b
    c = estimate_radius(x, max_queries=500, seed=12)
    assert (c.radius, c.ci_low, c.ci_high) != (a.radius, a.ci_low, a.ci_high)


def test_the_estimate_is_the_percentile_of_the_sampled_queries_exact_distances():
    x = FEATURE_SETS["heavy_tail"]()
    est = estimate_radius(x, max_queries=700, seed=5, percentile=95.0)
    ids = np.sort(np.random.default_rng(5).choice(len(x), size=700, replace=False))
    ref = brute_nearest_other(x)[ids]
    assert est.radius == pytest.approx(np.percentile(ref, 95.0), rel=1e-4)
    lo, hi = quantile_interval(700, 95.0, 0.95)
    assert est.ci_low == pytest.approx(np.sort(ref)[lo - 1], rel=1e-4)
    assert est.ci_high == pytest.approx(np.sort(ref)[hi - 1], rel=1e-4)


@pytest.mark.parametrize(
    ("m", "pct", "conf"), [(600, 99.0, 0.95), (8192, 99.0, 0.95), (50, 90.0, 0.9), (200, 50.0, 0.99)]
)
def test_order_statistic_interval_is_valid_and_tight(m, pct, conf):
    lo, hi = quantile_interval(m, pct, conf)
    p = pct / 100
    # B = #samples below the quantile ~ Binomial(m, p); the interval covers it iff lo <= B < hi.
    below, above = binom.cdf(lo - 1, m, p), binom.sf(hi - 1, m, p)
    assert below <= (1 - conf) / 2 and above <= (1 - conf) / 2
    assert binom.cdf(lo, m, p) > (1 - conf) / 2 and binom.sf(hi - 2, m, p) > (1 - conf) / 2  # one step tighter fails


def test_too_few_queries_give_an_open_interval():
    x = FEATURE_SETS["one_gaussian"]()
    est = estimate_radius(x, max_queries=20, seed=0)  # 20 samples cannot bound p99 from above
    assert est.ci_high == float("inf") and est.ci_low <= est.radius


def test_as_stats_keeps_the_radius_statistics_keys():
    est = estimate_radius(FEATURE_SETS["clustered"](), max_queries=300)
    stats = est.as_stats()
    assert isinstance(est, RadiusEstimate)
    assert {"p50", "p90", "p95", "p99", "suggested", "n_patches", "ci_low", "ci_high"} <= set(stats)
    assert stats["suggested"] == stats["p99"] == est.radius


def test_bad_arguments_name_the_value():
    x = FEATURE_SETS["clustered"]()[:50]
    with pytest.raises(InputError, match="max_queries"):
        estimate_radius(x, max_queries=1)
    with pytest.raises(InputError, match="percentile"):
        estimate_radius(x, percentile=100.0)
    with pytest.raises(InputError, match="confidence"):
        estimate_radius(x, confidence=1.0)
    with pytest.raises(InputError, match="at least 2"):
        estimate_radius(x[:1])
    with pytest.raises(InputError, match="2-d"):
        estimate_radius(x[0])
    with pytest.raises(InputTypeError, match="floating"):
        estimate_radius(x.astype(np.int64))
    bad = x.copy()
    bad[4, 0] = np.nan
    with pytest.raises(InputError, match="NaN or inf.*row 4"):
        estimate_radius(bad, max_queries=50)
