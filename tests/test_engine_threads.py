"""One ClusterBank shared by threads: writers serialise, readers run alongside."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from ocbank import ClusterBank

from .conftest import clustered

N_THREADS = 3
N_BATCHES = 6


def batches_of(t: int) -> list[np.ndarray]:
    X = clustered(N_BATCHES * 150, 32, 40, 3.0, 0.7, 100 + t)
    return np.array_split(X, N_BATCHES)


def run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn):
        def go():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001  (reported by the test)
                errors.append(exc)

        return go

    threads = [threading.Thread(target=wrap(fn), name=name) for name, fn in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung (deadlock?)"
    return errors


def test_concurrent_adds_equal_the_serial_stream_in_admission_order(tmp_path: Path):
    data = {f"w{t}": batches_of(t) for t in range(N_THREADS)}
    bank = ClusterBank(32, 4.0)
    order: list[str] = []
    # Called inside the write lock, so the list is the order the lock admitted the adds.
    bank._on_write = lambda op: order.append(threading.current_thread().name) if op == "add" else None
    start = threading.Barrier(N_THREADS + 2)
    stop = threading.Event()
    searched: list[tuple[int, int]] = []

    def writer(name):
        def go():
            start.wait()
            for batch in data[name]:
                bank.add(batch)
        return go

    def reader():
        q = clustered(64, 32, 40, 3.0, 0.7, 999)
        start.wait()
        while not stop.is_set():
            if len(bank) == 0:
                continue
            dist, ids = bank.search(q, k=3)
            assert dist.shape == ids.shape == (64, 3)
            assert ((ids >= -1) & (ids < len(bank))).all()
            assert np.isfinite(dist[ids >= 0]).all()
            searched.append((len(bank), bank.n_seen))

    def saver():
        start.wait()
        for i in range(5):
            bank.save(tmp_path / f"mid{i}.h5")

    targets = [(name, writer(name)) for name in data] + [("saver", saver)]
    search_thread = threading.Thread(target=reader)
    search_thread.start()
    errors = run_threads(targets)
    stop.set()
    search_thread.join(timeout=60)
    assert not errors, errors
    assert searched, "the reader never ran"

    total = sum(len(b) for batches in data.values() for b in batches)
    assert bank.n_seen == int(bank.counts.sum()) == total
    assert sorted(order) == sorted(name for name in data for _ in range(N_BATCHES))
    serial = ClusterBank(32, 4.0)
    cursor = dict.fromkeys(data, 0)
    for name in order:
        serial.add(data[name][cursor[name]])
        cursor[name] += 1
    np.testing.assert_array_equal(bank.counts, serial.counts)
    np.testing.assert_allclose(bank.means, serial.means, atol=1e-5)
    np.testing.assert_allclose(bank.m2, serial.m2, rtol=1e-6, atol=1e-3)

    for i in range(5):  # every save made during the adds is a consistent, loadable bank
        mid = ClusterBank.load(tmp_path / f"mid{i}.h5")
        assert mid.n_seen == int(mid.counts.sum())
    bank.save(tmp_path / "final.h5")
    loaded = ClusterBank.load(tmp_path / "final.h5")
    np.testing.assert_array_equal(loaded.counts, bank.counts)
    np.testing.assert_array_equal(loaded.means, bank.means)


def test_concurrent_merges_do_not_deadlock_or_lose_vectors():
    parts = [ClusterBank(32, 4.0).add(clustered(300, 32, 40, 3.0, 0.7, s)) for s in range(4)]
    target = ClusterBank(32, 4.0)
    # parts[0] is read by one merge while another merge writes it; two banks
    # merging into each other at once must not deadlock (each snapshots the other first).
    targets = [(f"m{i}", lambda p=p: target.merge(p)) for i, p in enumerate(parts)]
    targets += [("x", lambda: parts[0].merge(parts[1])), ("y", lambda: parts[1].merge(parts[2]))]
    errors = run_threads(targets)
    assert not errors, errors
    assert parts[0].n_seen == int(parts[0].counts.sum()) in (600, 900)
    assert target.n_seen == int(target.counts.sum())
    assert 1200 <= target.n_seen <= 1200 + 300 + 600


def test_merging_a_bank_into_itself_doubles_it():
    bank = ClusterBank(8, 1.0).add(clustered(200, 8, 5, 3.0, 0.2, 0))
    counts, means = bank.counts.copy(), bank.means.copy()
    bank.merge(bank)  # snapshot first: no self-deadlock
    assert bank.n_seen == 400 and int(bank.counts.sum()) == 400
    # Each centroid absorbs its own copy (distance 0) unless an earlier one is within r: totals hold.
    assert len(bank) <= len(counts)
    np.testing.assert_allclose(
        (bank.counts[:, None] * bank.means).sum(0), 2 * (counts[:, None] * means).sum(0), rtol=1e-4, atol=1e-2
    )


def test_taking_the_write_lock_inside_a_read_lock_fails_loudly():
    from ocbank.engine._rwlock import RWLock

    lock = RWLock()
    with lock.read(), pytest.raises(RuntimeError, match="upgrade"), lock.write():
        pass
    with lock.write():  # the lock is still usable afterwards
        pass
