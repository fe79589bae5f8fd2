"""ClusterBank's approximate search for large CPU banks: chosen by size, rebuilt after every change."""

from __future__ import annotations

import numpy as np
import pytest

from ocbank import ClusterBank
from ocbank.engine import ivf

from .conftest import clustered


def test_ivf_search_agrees_with_flat_and_follows_changes(monkeypatch):
    x = clustered(3000, 32, 60, 4.0, 0.5, 7)
    flat = ClusterBank(32, 0.9, search_index="flat").add(x)
    approx = ClusterBank(32, 0.9, search_index="ivf").add(x)
    assert len(flat) == len(approx) > 500
    q = clustered(500, 32, 60, 4.0, 0.5, 8)
    d_flat, i_flat = flat.search(q)
    d_ivf, i_ivf = approx.search(q)
    recall = float(np.mean(i_flat[:, 0] == i_ivf[:, 0]))
    assert recall >= 0.95
    hit = i_flat[:, 0] == i_ivf[:, 0]
    np.testing.assert_allclose(d_ivf[hit], d_flat[hit], rtol=1e-4)
    assert (d_ivf >= d_flat - 1e-4).all()  # an approximate search never finds a nearer centroid
    # A new centroid far from all others must be found at once: the index is rebuilt after add.
    far = np.full((1, 32), 100.0, dtype=np.float32)
    approx.add(far)
    assert approx.search(far)[1][0, 0] == len(approx) - 1 and approx.search(far)[0][0, 0] == 0.0


def test_auto_switches_to_ivf_only_above_the_threshold(monkeypatch):
    x = clustered(800, 16, 40, 4.0, 0.4, 3)
    built = []
    real = ivf.IvfSearch.from_means.__func__

    def counting(cls, means, *a, **kw):
        built.append(len(means))
        return real(cls, means, *a, **kw)

    monkeypatch.setattr(ivf.IvfSearch, "from_means", classmethod(counting))
    bank = ClusterBank(16, 0.6).add(x)  # auto, small: flat
    bank.search(x[:10])
    assert built == []
    monkeypatch.setattr("ocbank.engine.bank.use_ivf", lambda k: k >= 10)
    bank.search(x[:10])
    bank.search(x[:10])
    assert built == [len(bank)]  # built once, reused while the bank is unchanged
    with pytest.raises(ValueError):
        ClusterBank(16, 0.6, search_index="hnsw")


def test_ivf_never_returns_missing_neighbours_when_the_bank_has_them_and_survives_save(tmp_path):
    x = clustered(3000, 8, 300, 3.0, 0.3, 5)
    bank = ClusterBank(8, 0.05, search_index="ivf").add(x)
    assert len(bank) > 1000
    d, i = bank.search(x[:20], k=1000)  # beyond what the probed lists hold, and beyond IVF's k
    assert (i >= 0).all() and np.isfinite(d).all()
    d_ivf, i_ivf = bank.search(x[:20], k=50)
    assert (i_ivf >= 0).all()
    index = bank._ivf
    bank.save(tmp_path / "b.h5")
    bank.search(x[:5])
    assert bank._ivf is index  # a save does not throw the index away; an add does
    bank.add(x[:1] + 100)
    assert bank._ivf is None
