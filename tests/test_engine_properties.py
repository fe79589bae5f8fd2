"""Property-based tests (hypothesis): split invariance, byte-stable files, merge order.

Examples are bounded (max_examples) and deadline-free so the suite stays fast
and stable on a contended 2-core machine.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ocbank import ClusterBank

from .reference import reference_bank

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


def make_stream(seed: int, n: int, dim: int, n_clusters: int, noise: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)) * 3.0
    X = centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, dim)) * noise
    if n > 4:  # some exact repeats: ties and zero distances
        X[rng.integers(0, n, n // 5)] = X[rng.integers(0, n, n // 5)]
    return X.astype(np.float32)


streams = st.builds(
    make_stream,
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    dim=st.integers(1, 12),
    n_clusters=st.integers(1, 30),
    noise=st.sampled_from([0.0, 0.1, 0.5, 1.5]),
)


@SETTINGS
@given(X=streams, radius=st.sampled_from([0.3, 1.0, 2.5, 6.0]), cuts=st.lists(st.integers(0, 300), max_size=8),
       cap=st.sampled_from([None, 3, 10]))
def test_any_batch_split_gives_the_one_batch_bank(X, radius, cuts, cap):
    """Counts equal exactly; means and m2 equal up to float32 rounding; with or without a cap."""
    whole = ClusterBank(X.shape[1], radius, max_centroids=cap).add(X)
    pieces = ClusterBank(X.shape[1], radius, max_centroids=cap)
    bounds = [0, *sorted(c for c in cuts if c < len(X)), len(X)]
    for a, b in itertools.pairwise(bounds):
        pieces.add(X[a:b])
    np.testing.assert_array_equal(pieces.counts, whole.counts)
    np.testing.assert_allclose(pieces.means, whole.means, rtol=1e-5, atol=1e-4)
    scale = 1e-6 * whole.counts * max(1.0, float((X.astype(np.float64) ** 2).sum(1).mean()))
    assert (np.abs(pieces.m2 - whole.m2) <= scale).all()
    assert pieces.radius_ == whole.radius_ and pieces.n_seen == whole.n_seen == len(X)
    if cap is None:  # and both equal the float64 one-at-a-time reference
        ref = reference_bank(X, radius)
        np.testing.assert_array_equal(whole.counts, ref.counts)
        assert (np.abs(whole.m2 - ref.m2) <= scale).all()
    else:
        assert len(whole) <= cap


@settings(max_examples=10, deadline=None, derandomize=True)
@given(X=streams, radius=st.sampled_from([0.5, 2.0]), cap=st.sampled_from([None, 4]))
def test_save_load_save_is_byte_stable(X, radius, cap):
    bank = ClusterBank(X.shape[1], radius, max_centroids=cap).add(X)
    with tempfile.TemporaryDirectory() as tmp:
        first, second = Path(tmp, "a.h5"), Path(tmp, "b.h5")
        bank.save(first, metadata={"k": [1, 2.5, "x"]})
        ClusterBank.load(first).save(second)
        assert first.read_bytes() == second.read_bytes()


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(1, 120), min_size=2, max_size=3),
       radius=st.sampled_from([0.5, 2.0, 5.0]))
def test_merge_order_never_changes_totals(seed, sizes, radius):
    """For arbitrary banks, every merge order gives the same n_seen, sum(counts) and sum(n mu) (up to rounding)."""
    banks = [bank_of(make_stream(seed + i, n, 6, 8, 0.7), radius) for i, n in enumerate(sizes)]
    total = sum(np.asarray(b.counts[:, None] * b.means.astype(np.float64)).sum(0) for b in banks)
    for order in itertools.permutations(range(len(banks))):
        merged = ClusterBank(6, radius)
        for i in order:
            merged.merge(banks[i])
        assert merged.n_seen == int(merged.counts.sum()) == sum(sizes)
        np.testing.assert_allclose((merged.counts[:, None] * merged.means.astype(np.float64)).sum(0), total,
                                   rtol=1e-5, atol=1e-3)


def bank_of(points: np.ndarray, radius: float) -> ClusterBank:
    return ClusterBank(points.shape[1], radius).add(points)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n_banks=st.integers(2, 4), dim=st.integers(2, 8))
def test_merge_order_changes_neither_totals_nor_grouped_counts(seed, n_banks, dim):
    """What merge order may and may not change.

    Always (any banks): n_seen, sum(counts), sum(n mu) and the total scatter
    sum(m2) + sum(n ||mu - mean||^2) are the same for every order, because
    absorbing a weighted centroid pools counts, means and M2 exactly.

    Grouped banks: every centroid lies within r/2 of one of a set of centers
    that are more than 3r apart. Then in any order each group collapses to one
    centroid (a merged centroid is within r of its group's running mean, which
    stays within r/2 of the center as a convex combination, and more than 2r
    from any other group's), so K = number of occupied groups and each group's
    count is the same for every order; only means move (float rounding).
    """
    rng = np.random.default_rng(seed)
    radius = 1.0
    centers = np.arange(6)[:, None] * 4.0 * np.eye(dim)[0]  # 4r apart along one axis
    banks = []
    for _ in range(n_banks):
        which = rng.choice(6, size=rng.integers(1, 5), replace=False)
        # Points within r/4 of their center, so every centroid (a mean of them) is within r/2 of it.
        pts = centers[rng.choice(which, 40)] + rng.uniform(-1, 1, (40, dim)) * (0.25 / np.sqrt(dim))
        banks.append(bank_of(pts.astype(np.float32), radius))
    results = []
    for order in itertools.permutations(range(n_banks)):
        merged = ClusterBank(dim, radius)
        for i in order:
            merged.merge(banks[i])
        results.append(merged)
    X = np.concatenate([np.repeat(b.means.astype(np.float64), b.counts, 0) for b in banks])
    for m in results:
        assert m.n_seen == int(m.counts.sum()) == 40 * n_banks
        np.testing.assert_allclose((m.counts[:, None] * m.means).sum(0), X.sum(0), rtol=1e-5, atol=1e-3)
        group = np.argmin(((m.means[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
        assert len(set(group.tolist())) == len(group)  # one centroid per group
        per_group = dict(zip(group.tolist(), m.counts.tolist(), strict=True))
        first = results[0]
        g0 = np.argmin(((first.means[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
        assert per_group == dict(zip(g0.tolist(), first.counts.tolist(), strict=True))
        assert abs(m.m2.sum() - results[0].m2.sum()) <= 1e-4 * max(1.0, results[0].m2.sum())
