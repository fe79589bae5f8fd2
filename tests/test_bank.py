"""ClusterBank against the one-vector-at-a-time reference, and its API contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ocbank import ClusterBank
from ocbank.engine.store import TorchStore
from ocbank.errors import DeviceError

from .conftest import clustered
from .reference import reference_stream


def assert_same_bank(bank_means, bank_counts, ref_means, ref_counts, atol=1e-4) -> None:
    assert len(bank_counts) == len(ref_counts)
    np.testing.assert_array_equal(bank_counts, ref_counts)
    np.testing.assert_allclose(bank_means, ref_means, rtol=1e-5, atol=atol)


def feed(bank: ClusterBank, X: np.ndarray, splits: list[int]) -> ClusterBank:
    start = 0
    for stop in [*splits, len(X)]:
        bank.add(X[start:stop])
        start = stop
    return bank


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow), 64, 10_000])
def test_add_equals_one_at_a_time_reference(stream, batch):
    X, radius = stream
    ref_means, ref_counts = reference_stream(X, radius)
    bank = ClusterBank(X.shape[1], radius)
    feed(bank, X, list(range(batch, len(X), batch)))
    assert_same_bank(bank.means, bank.counts, ref_means, ref_counts)
    assert bank.n_seen == len(X) == int(bank.counts.sum())


def test_streaming_in_random_pieces_equals_streaming_at_once(stream):
    X, radius = stream
    whole = ClusterBank(X.shape[1], radius).add(X)
    rng = np.random.default_rng(7)
    for _ in range(3):
        splits = sorted(rng.choice(np.arange(1, len(X)), size=12, replace=False).tolist())
        pieces = feed(ClusterBank(X.shape[1], radius), X, splits)
        np.testing.assert_array_equal(pieces.counts, whole.counts)
        np.testing.assert_allclose(pieces.means, whole.means, rtol=1e-6, atol=1e-5)


def test_exact_radius_is_absorbed_and_ties_go_to_lowest_index():
    bank = ClusterBank(2, 5.0)
    bank.add(np.array([[0, 0], [3, 4]], dtype=np.float32))  # distance exactly 5
    assert len(bank) == 1 and bank.counts.tolist() == [2]
    bank = ClusterBank(1, 5.0).add(np.array([[40], [50], [45]], dtype=np.float64))
    assert bank.counts.tolist() == [2, 1]  # 45 is 5 from both: the lower index wins
    np.testing.assert_allclose(bank.means[:, 0], [42.5, 50.0])
    just_outside = ClusterBank(2, 5.0).add(np.array([[0, 0], [3, 4.0001]], dtype=np.float32))
    assert len(just_outside) == 2


def test_many_exact_ties_pick_the_lowest_index():
    axes = np.eye(100, dtype=np.float32) * 10.0  # pairwise 14.1 apart
    bank = ClusterBank(100, 10.0).add(np.vstack([axes, np.zeros((1, 100), np.float32)]))
    assert len(bank) == 100
    assert bank.counts[0] == 2 and (bank.counts[1:] == 1).all()


@pytest.mark.parametrize("n_candidates", [pytest.param(1, marks=pytest.mark.slow), 2, 5])
def test_candidate_mode_used_on_gpu_matches_reference(stream, n_candidates):
    """TorchStore's candidate lists and fallback, exercised on CPU tensors."""
    X, radius = stream
    ref_means, ref_counts = reference_stream(X, radius)
    store = TorchStore(X.shape[1], radius, "cpu", n_candidates=n_candidates)
    for start in range(0, len(X), 97):
        rows = torch.from_numpy(X[start : start + 97])
        store.add(rows, np.ones(len(rows), dtype=np.int64))
    assert_same_bank(store.means, store.counts, ref_means, ref_counts)


def test_float64_and_torch_inputs_are_accepted():
    X = clustered(300, 16, 5, 3.0, 0.5, 9)
    a = ClusterBank(16, 2.0).add(X)
    b = ClusterBank(16, 2.0).add(X.astype(np.float64))
    c = ClusterBank(16, 2.0).add(torch.from_numpy(X))
    d = ClusterBank(16, 2.0).add(X.astype(np.int64))  # integers are numeric too
    for other in (b, c):
        np.testing.assert_array_equal(other.counts, a.counts)
        np.testing.assert_allclose(other.means, a.means, atol=1e-6)
    assert d.n_seen == len(X)


def test_means_is_read_only_and_counts_int64():
    bank = ClusterBank(8, 1.0).add(clustered(50, 8, 3, 3.0, 0.2, 0))
    assert bank.means.dtype == np.float32 and bank.means.shape == (len(bank), 8)
    assert bank.counts.dtype == np.int64
    with pytest.raises(ValueError):
        bank.means[0, 0] = 1.0
    assert bank.nbytes == len(bank) * (8 * 4 + 8)


def test_buffer_grows_past_initial_capacity():
    X = (np.random.default_rng(5).standard_normal((3000, 4)) * 50).astype(np.float32)  # all distinct
    bank = ClusterBank(4, 0.01).add(X)
    assert len(bank) == 3000
    np.testing.assert_allclose(bank.means, X)


# ---------------------------------------------------------------------- bad input
def snapshot(bank: ClusterBank):
    return bank.means.copy(), bank.counts.copy(), bank.n_seen


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (np.full((2, 4), np.nan, dtype=np.float32), ValueError, "NaN or inf"),
        (np.array([[1, 2, 3, np.inf]], dtype=np.float64), ValueError, "row 0"),
        (np.zeros((3, 5), dtype=np.float32), ValueError, "shape [n, 4]"),
        (np.zeros(4, dtype=np.float32), ValueError, "shape [n, 4]"),
        (np.zeros((1, 2, 4), dtype=np.float32), ValueError, "shape [n, 4]"),
        (np.array([["a", "b", "c", "d"]]), TypeError, "numeric"),
        (np.zeros((2, 4), dtype=bool), TypeError, "numeric"),
        (np.zeros((2, 4), dtype=np.complex64), TypeError, "numeric"),
        (torch.zeros((2, 4), dtype=torch.bool), TypeError, "numeric"),
        (torch.full((2, 4), float("nan")), ValueError, "NaN or inf"),
    ],
)
def test_bad_input_is_refused_and_bank_unchanged(bad, error, words):
    bank = ClusterBank(4, 1.0).add(clustered(40, 4, 3, 3.0, 0.2, 0))
    before = snapshot(bank)
    with pytest.raises(error) as info:
        bank.add(bad)
    assert words in str(info.value)
    after = snapshot(bank)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2] == after[2]


def test_nan_in_the_middle_of_a_batch_changes_nothing():
    bank = ClusterBank(4, 1.0).add(clustered(40, 4, 3, 3.0, 0.2, 0))
    before = snapshot(bank)
    batch = clustered(100, 4, 3, 3.0, 0.2, 1)
    batch[57, 2] = np.nan
    with pytest.raises(ValueError, match="row 57"):
        bank.add(batch)
    np.testing.assert_array_equal(bank.counts, before[1])


def test_empty_batch_is_a_no_op():
    bank = ClusterBank(4, 1.0)
    assert bank.add(np.zeros((0, 4), dtype=np.float32)) is bank
    assert len(bank) == 0 and bank.n_seen == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dim": 0, "radius": 1.0},
        {"dim": -3, "radius": 1.0},
        {"dim": 2.5, "radius": 1.0},
        {"dim": 4, "radius": 0.0},
        {"dim": 4, "radius": -1.0},
        {"dim": 4, "radius": float("nan")},
        {"dim": 4, "radius": float("inf")},
        {"dim": 4, "radius": "26"},
        {"dim": 4, "radius": 1.0, "device": "tpu"},
    ],
)
def test_invalid_construction_is_refused(kwargs):
    with pytest.raises(ValueError, match="got"):
        ClusterBank(**kwargs)


def test_cuda_request_without_gpu_fails_clearly_on_cpu_machines():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    bank = ClusterBank(4, 1.0, device="cuda")
    with pytest.raises(DeviceError, match="device='cpu'"):
        bank.add(np.zeros((1, 4), dtype=np.float32))
    assert ClusterBank(4, 1.0, device="auto").add(np.zeros((1, 4), np.float32)).device_in_use == "cpu"


# ---------------------------------------------------------------------- search
def test_search_matches_brute_force_plain_l2():
    X = clustered(500, 12, 10, 3.0, 0.5, 3)
    bank = ClusterBank(12, 1.0).add(X)
    q = clustered(64, 12, 10, 3.0, 0.5, 4)
    dist, ids = bank.search(q, k=3)
    brute = np.sqrt(((q[:, None, :].astype(np.float64) - bank.means[None].astype(np.float64)) ** 2).sum(-1))
    order = np.argsort(brute, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(dist, np.take_along_axis(brute, order, 1), rtol=1e-4, atol=1e-3)
    assert dist.dtype == np.float32 and ids.dtype == np.int64


def test_search_pads_when_k_exceeds_bank_and_checks_input():
    bank = ClusterBank(3, 1.0).add(np.eye(3, dtype=np.float32) * 10)
    dist, ids = bank.search(np.zeros((2, 3), np.float32), k=5)
    assert ids[:, 3:].tolist() == [[-1, -1], [-1, -1]] and np.isinf(dist[:, 3:]).all()
    with pytest.raises(ValueError, match="shape"):
        bank.search(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="empty"):
        ClusterBank(3, 1.0).search(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="k must"):
        bank.search(np.zeros((1, 3), np.float32), k=0)


def test_search_sees_every_update():
    bank = ClusterBank(2, 3.0).add(np.array([[0.0, 0.0]]))
    bank.add(np.array([[2.0, 0.0]]))  # moves centroid 0 to (1, 0)
    dist, ids = bank.search(np.array([[1.0, 0.0]]))
    assert ids[0, 0] == 0 and dist[0, 0] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------- merge
def test_merge_follows_weighted_reference_and_preserves_totals():
    A = clustered(700, 16, 12, 3.0, 0.6, 10)
    B = clustered(500, 16, 12, 3.0, 0.6, 11)
    a = ClusterBank(16, 2.5).add(A)
    b = ClusterBank(16, 2.5).add(B)
    ref_means, ref_counts = reference_stream(
        b.means, 2.5, weights=b.counts, means=a.means.astype(np.float64), counts=a.counts
    )
    a.merge(b)
    assert_same_bank(a.means, a.counts, ref_means, ref_counts)
    assert a.n_seen == 1200 == int(a.counts.sum())
    weighted = (a.means.astype(np.float64) * a.counts[:, None]).sum(0) / a.counts.sum()
    np.testing.assert_allclose(weighted, np.vstack([A, B]).astype(np.float64).mean(0), atol=1e-4)


def test_merge_empty_and_mismatches():
    a = ClusterBank(8, 1.0).add(clustered(100, 8, 4, 3.0, 0.3, 0))
    before = snapshot(a)
    a.merge(ClusterBank(8, 1.0))
    np.testing.assert_array_equal(a.means, before[0])
    np.testing.assert_array_equal(a.counts, before[1])
    with pytest.raises(ValueError, match="dim"):
        a.merge(ClusterBank(9, 1.0))
    with pytest.raises(ValueError, match="radius"):
        a.merge(ClusterBank(8, 2.0))
    with pytest.raises(TypeError):
        a.merge(np.zeros((2, 8)))


def test_sklearn_style_aliases():
    X = clustered(200, 8, 4, 3.0, 0.3, 0)
    bank = ClusterBank(8, 1.0)
    assert bank.partial_fit(X[:100]) is bank
    bank.partial_fit(X[100:])
    refit = ClusterBank(8, 1.0).fit(X[:50]).fit(X)
    np.testing.assert_array_equal(refit.counts, bank.counts)
    assert (bank.predict(bank.means) == np.arange(len(bank))).all()
