"""The one store contract: CpuStore and TorchStore satisfy Store and keep books the same way."""

from __future__ import annotations

import numpy as np
import pytest

from ocbank.engine import Store
from ocbank.engine.store import CpuStore, TorchStore

from .conftest import clustered


def make(kind: str, dim: int, radius: float) -> Store:
    return CpuStore(dim, radius) if kind == "cpu" else TorchStore(dim, radius, "cpu", n_candidates=4)


@pytest.mark.parametrize("kind", ["cpu", "torch"])
def test_both_stores_satisfy_the_protocol_and_round_trip_their_state(kind):
    store = make(kind, 8, 1.0)
    assert isinstance(store, Store)
    X = clustered(700, 8, 30, 3.0, 0.3, 1)
    assert store.absorb(store.rows(X), np.ones(len(X), np.int64)) == len(X)
    assert store.capacity >= store.size and store.capacity >= 256
    means, counts, m2 = store.state()
    assert means.dtype == np.float32 and counts.dtype == np.int64 and m2.dtype == np.float64
    other = make(kind, 8, 1.0)
    other.set_state(means, counts, m2)
    for got, want in zip(other.state(), (means, counts, m2), strict=True):
        np.testing.assert_array_equal(got, want)
    d, i = other.search(other.rows(means), 1)
    np.testing.assert_array_equal(np.asarray(i)[:, 0], np.arange(len(counts)))


def test_both_stores_keep_identical_books_and_stop_at_the_same_row_at_a_limit():
    X = clustered(500, 8, 60, 3.0, 0.3, 2)
    w = np.random.default_rng(0).integers(1, 5, len(X))
    pm2 = np.random.default_rng(1).uniform(0, 2, len(X))
    cpu, tch = make("cpu", 8, 1.5), make("torch", 8, 1.5)
    stops = [s.absorb(s.rows(X), w, pm2, limit=25) for s in (cpu, tch)]
    assert stops[0] == stops[1] < len(X) and cpu.size == tch.size == 25
    np.testing.assert_array_equal(cpu.counts, tch.counts)
    assert int(cpu.counts.sum()) == int(w[: stops[0]].sum())
    np.testing.assert_allclose(cpu.m2, tch.m2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cpu.state()[0], tch.state()[0], atol=1e-5)
    # The row it stopped at needs a new centroid: it is farther than r from all 25.
    d, _ = cpu.search(cpu.rows(X[stops[0] : stops[0] + 1]), 1)
    assert d[0, 0] > 1.5**2
