"""The hard centroid cap (max_centroids): bound, reference equality, split invariance, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ocbank import ClusterBank
from ocbank.engine.store import CpuStore, TorchStore

from .reference import reference_bank

CAP = 40


def distinct(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Gaussian points, all pairwise much further apart than the starting radius 0.5."""
    return (np.random.default_rng(seed).standard_normal((n, dim)) * 3).astype(np.float32)


def feed(bank: ClusterBank, X: np.ndarray, splits: list[int], check=None) -> ClusterBank:
    start = 0
    for stop in [*splits, len(X)]:
        bank.add(X[start:stop])
        if check is not None:
            check(bank)
        start = stop
    return bank


def test_cap_holds_after_every_add_and_bank_equals_capped_reference():
    X = distinct(10 * CAP)
    ref = reference_bank(X, 0.5, max_centroids=CAP)
    sizes = []
    bank = feed(ClusterBank(8, 0.5, max_centroids=CAP), X, list(range(1, len(X))), lambda b: sizes.append(len(b)))
    assert max(sizes) == CAP  # the cap was reached, and never passed
    assert len(bank.radius_history_) > 0
    np.testing.assert_array_equal(bank.counts, ref.counts)
    np.testing.assert_allclose(bank.means, ref.means, atol=1e-4)
    np.testing.assert_allclose(bank.m2, ref.m2, rtol=1e-5, atol=1e-3)
    assert bank.radius_ == pytest.approx(ref.radius)
    assert len(bank.radius_history_) == len(ref.history)
    ints = ("n_seen", "k_before", "k_after")
    for got, want in zip(bank.radius_history_, ref.history, strict=True):
        assert [got[k] for k in ints] == [want[k] for k in ints]
        assert (got["old"], got["new"]) == pytest.approx((want["old"], want["new"]))
    for h in bank.radius_history_:
        assert h["new"] == pytest.approx(h["old"] * 1.25) and h["k_before"] == CAP and h["k_after"] <= CAP


def test_cap_holds_inside_one_large_add(monkeypatch):
    """The kernel stops mid-chunk: no intermediate store state ever exceeds the cap."""
    X = distinct(10 * CAP, seed=1)
    seen = []
    real_apply = CpuStore._apply

    def spy(self, chunk, weights, assign, k_new):
        seen.append(k_new)
        return real_apply(self, chunk, weights, assign, k_new)

    monkeypatch.setattr(CpuStore, "_apply", spy)
    bank = ClusterBank(8, 0.5, max_centroids=CAP).add(X)
    assert max(seen) == CAP and len(bank) <= CAP
    ref = reference_bank(X, 0.5, max_centroids=CAP)
    np.testing.assert_array_equal(bank.counts, ref.counts)


@pytest.mark.parametrize("batch", [1, 17, 128, 400])
def test_capped_bank_is_batch_split_invariant(batch):
    X = distinct(10 * CAP, seed=2)
    whole = ClusterBank(8, 0.5, max_centroids=CAP).add(X)
    pieces = feed(ClusterBank(8, 0.5, max_centroids=CAP), X, list(range(batch, len(X), batch)))
    np.testing.assert_array_equal(pieces.counts, whole.counts)
    np.testing.assert_allclose(pieces.means, whole.means, atol=1e-5)
    np.testing.assert_allclose(pieces.m2, whole.m2, rtol=1e-6, atol=1e-4)
    assert pieces.radius_history_ == whole.radius_history_


def test_capped_bank_against_uncapped_bank_at_the_final_radius():
    """What a capped bank and an uncapped bank at its final radius r_f must share.

    They need not have the same centroids (the capped one clustered at smaller
    radii first, then re-clustered its centroids), but both are partitions of
    the same vectors whose centroids are the exact means of their members and
    whose m2 is their exact scatter, because absorbing and pooling are exact
    (Welford / Chan). So both must have: n_seen = sum(counts) = N; the
    count-weighted mean of the centroids equal to the data mean; the total
    scatter split exactly, sum(m2) + sum(n ||mu - mean||^2) = sum ||x - mean||^2.
    Only the capped one is bound by K <= max_centroids. Each vector lies within
    sqrt(m2) of its own centroid (the centroid is the mean of its members), so
    its distance to the nearest capped centroid is <= sqrt(max m2): a bound
    computed from the bank, checked against brute force over the raw data.
    """
    X = distinct(10 * CAP, seed=3)
    X64 = X.astype(np.float64)
    capped = ClusterBank(8, 0.5, max_centroids=CAP).add(X)
    uncapped = ClusterBank(8, capped.radius_).add(X)
    grand = X64.mean(0)
    total = ((X64 - grand) ** 2).sum()
    assert len(capped) <= CAP
    for bank in (capped, uncapped):
        assert bank.n_seen == int(bank.counts.sum()) == len(X)
        mu = bank.means.astype(np.float64)
        np.testing.assert_allclose((bank.counts[:, None] * mu).sum(0) / len(X), grand, atol=1e-4)
        between = (bank.counts * ((mu - grand) ** 2).sum(1)).sum()
        assert bank.m2.sum() + between == pytest.approx(total, rel=1e-5)
    nearest = np.sqrt(((X64[:, None, :] - capped.means[None].astype(np.float64)) ** 2).sum(-1)).min(1)
    assert (nearest <= np.sqrt(capped.m2.max()) + 1e-4).all()


def test_capped_bank_on_the_host_decided_torch_path_equals_reference(monkeypatch):
    """The GPU-style store (candidate mode, means updated after the kernel) stops at the cap too."""
    X = distinct(6 * CAP, seed=4)
    monkeypatch.setattr(ClusterBank, "_new_store", lambda self: TorchStore(self.dim, self.radius_, "cpu", 3))
    bank = feed(ClusterBank(8, 0.5, max_centroids=CAP), X, list(range(50, len(X), 50)))
    assert isinstance(bank.store_, TorchStore)
    ref = reference_bank(X, 0.5, max_centroids=CAP)
    np.testing.assert_array_equal(bank.counts, ref.counts)
    np.testing.assert_allclose(bank.means, ref.means, atol=1e-4)
    assert bank.radius_ == pytest.approx(ref.radius)


def test_save_load_continue_equals_uninterrupted(tmp_path: Path):
    X = distinct(10 * CAP, seed=5)
    whole = ClusterBank(8, 0.5, max_centroids=CAP, radius_growth=1.5).add(X)
    first = ClusterBank(8, 0.5, max_centroids=CAP, radius_growth=1.5).add(X[:150])
    assert first.radius_history_  # the cut falls after some raises
    first.save(tmp_path / "cap.h5")
    resumed = ClusterBank.load(tmp_path / "cap.h5")
    assert (resumed.max_centroids, resumed.radius_growth) == (CAP, 1.5)
    assert resumed.radius_history_ == first.radius_history_
    resumed.add(X[150:])
    np.testing.assert_array_equal(resumed.counts, whole.counts)
    np.testing.assert_allclose(resumed.means, whole.means, atol=1e-5)
    np.testing.assert_allclose(resumed.m2, whole.m2, rtol=1e-6, atol=1e-4)
    assert resumed.radius_ == whole.radius_ and resumed.radius_history_ == whole.radius_history_


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_centroids": 1},
        {"max_centroids": 0},
        {"max_centroids": 2.5},
        {"max_centroids": True},
        {"radius_growth": 1.0},
        {"radius_growth": 0.5},
        {"radius_growth": float("inf")},
    ],
)
def test_invalid_cap_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="got"):
        ClusterBank(4, 1.0, **kwargs)


def test_fit_restarts_a_capped_bank_from_its_first_radius():
    X = distinct(4 * CAP, seed=6)
    bank = ClusterBank(8, 0.5, max_centroids=CAP).add(X)
    assert bank.radius_ > 0.5
    refit = bank.fit(X)
    fresh = ClusterBank(8, 0.5, max_centroids=CAP).add(X)
    assert refit.radius_ == fresh.radius_ and refit.radius_history_ == fresh.radius_history_
    np.testing.assert_array_equal(refit.counts, fresh.counts)


def test_the_cap_grows_the_fitted_radius_never_the_hyperparameter(tmp_path: Path):
    """radius is what the bank was given (fitting never changes it); the cap grows the fitted radius_."""
    X = distinct(4 * CAP, seed=7)
    bank = ClusterBank(8, 0.5, max_centroids=CAP).add(X)
    assert bank.radius == 0.5 and bank.radius_ > 0.5
    assert bank.radius_ == bank.radius_history_[-1]["new"] and bank.radius_history_[0]["old"] == 0.5
    assert "radius=0.5" in repr(bank) and f"radius_={bank.radius_}" in repr(bank)
    bank.save(tmp_path / "b.h5")  # the file stores the radius the bank absorbs at, as before
    loaded = ClusterBank.load(tmp_path / "b.h5")
    assert (loaded.radius, loaded.radius_) == (0.5, bank.radius_)
    more = distinct(CAP, seed=8)
    np.testing.assert_array_equal(loaded.add(more).counts, bank.add(more).counts)  # streams on at radius_
    assert loaded.fit(X).radius_ == ClusterBank(8, 0.5, max_centroids=CAP).add(X).radius_
