"""IvfSearch against brute-force 1-NN (scipy cdist, float64)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from ocbank.engine.ivf import IvfSearch, default_nlist, default_nprobe, use_ivf
from ocbank.errors import InputError, InputTypeError

from .conftest import clustered


def _case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means [4000, 32] in 40 clusters, queries near them, and the brute-force squared distances [200, 4000]."""
    means = clustered(4000, 32, 40, 4.0, 1.0, seed)
    rng = np.random.default_rng(seed + 1)
    queries = (means[rng.integers(0, len(means), 200)] + rng.standard_normal((200, 32)) * 0.5).astype(np.float32)
    return means, queries, cdist(queries.astype(np.float64), means.astype(np.float64), "sqeuclidean")


def test_nprobe_equal_to_nlist_is_exact_flat_search():
    means, queries, ref = _case()
    ivf = IvfSearch.from_means(means, nlist=32, nprobe=32)
    sq, ids = ivf.search(queries, k=3)
    assert sq.shape == ids.shape == (200, 3) and sq.dtype == np.float32 and ids.dtype == np.int64
    order = np.argsort(ref, axis=1)[:, :3]
    np.testing.assert_array_equal(ids[:, 0], order[:, 0])
    np.testing.assert_allclose(sq, np.take_along_axis(ref, order, axis=1), rtol=1e-4, atol=1e-3)


def test_default_parameters_give_high_recall_and_never_underestimate():
    means, queries, ref = _case(3)
    ivf = IvfSearch.from_means(means)
    assert ivf.params.nlist == default_nlist(4000) == 253 and ivf.params.nprobe == default_nprobe(253) == 32
    sq, ids = ivf.search(queries)
    recall = np.mean(ids[:, 0] == ref.argmin(axis=1))
    assert recall >= 0.95, recall
    # A visited centroid's distance is exact, so a miss can only give a larger 1-NN distance.
    assert np.all(sq[:, 0] >= ref.min(axis=1) * (1 - 1e-4) - 1e-3)
    np.testing.assert_allclose(sq[:, 0], ref[np.arange(200), ids[:, 0]], rtol=1e-4, atol=1e-3)


def test_recall_grows_with_nprobe_and_single_probe_misses_some():
    means, queries, ref = _case(5)
    ivf = IvfSearch.from_means(means, nlist=128, seed=2)
    truth = ref.argmin(axis=1)
    recalls = [np.mean(ivf.with_nprobe(p).search(queries)[1][:, 0] == truth) for p in (1, 8, 128)]
    assert recalls[0] <= recalls[1] <= recalls[2] == 1.0
    assert recalls[0] < 1.0  # the test can see an approximation at all


def test_seeded_build_is_reproducible():
    means, queries, _ = _case(7)
    a = IvfSearch.from_means(means, nlist=64, nprobe=4, seed=9).search(queries)
    b = IvfSearch.from_means(means, nlist=64, nprobe=4, seed=9).search(queries)
    np.testing.assert_array_equal(a[1], b[1])


def test_threshold_and_errors():
    assert not use_ivf(49_999) and use_ivf(50_000) and use_ivf(10, threshold=5)
    means, queries, _ = _case()
    with pytest.raises(InputError, match="nlist"):
        IvfSearch.from_means(means, nlist=0)
    with pytest.raises(InputError, match="nprobe"):
        IvfSearch.from_means(means, nlist=8, nprobe=9)
    with pytest.raises(InputTypeError, match="numpy array"):
        IvfSearch.from_means(means.tolist())
    with pytest.raises(InputError, match="NaN"):
        IvfSearch.from_means(np.full((10, 4), np.nan, np.float32))
    ivf = IvfSearch.from_means(means[:200], nlist=4)
    with pytest.raises(InputError, match=r"\[n >= 1, 32\]"):
        ivf.search(queries[:, :16])
    with pytest.raises(InputError, match="k must"):
        ivf.search(queries, k=0)
