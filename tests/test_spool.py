"""FeatureSpool: the in-memory and spilled paths return the appended rows, in order, and clean up."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocbank.errors import InputError, InputTypeError, NotFittedError
from ocbank.model.radius import estimate_radius
from ocbank.model.spool import FeatureSpool

DIM = 6
ROW_BYTES = 4 * DIM


def _blocks(seed: int, sizes: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, DIM)).astype(np.float32) for n in sizes]


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    limit_rows=st.integers(0, 120),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 1000),
)
def test_rows_come_back_in_order_whatever_the_limit(tmp_path_factory, sizes, limit_rows, chunk, seed):
    blocks = _blocks(seed, sizes)
    expected = np.concatenate(blocks)
    spill = tmp_path_factory.mktemp("spill")
    with FeatureSpool(DIM, limit_rows * ROW_BYTES + 3, spill_dir=spill) as spool:  # +3: a limit mid-row
        for b in blocks:
            spool.append(b)
            assert spool.memory_bytes <= spool.max_memory_bytes  # memory never exceeds the limit
        assert spool.n_rows == len(expected)
        assert spool.n_memory_rows == min(limit_rows, len(expected))
        assert spool.spilled == (len(expected) > limit_rows)
        chunks = list(spool.iter_chunks(chunk))
        assert all(len(c) == chunk for c in chunks[:-1]) and all(c.dtype == np.float32 for c in chunks)
        got = np.concatenate(chunks) if chunks else np.empty((0, DIM), np.float32)
        np.testing.assert_array_equal(got, expected)
        if len(expected):
            idx = np.random.default_rng(seed).integers(0, len(expected), 17)
            np.testing.assert_array_equal(spool.take(idx), expected[idx])
    assert list(spill.iterdir()) == []  # the spill file is gone


def test_in_memory_and_spilled_spools_agree_and_the_file_is_removed(tmp_path):
    blocks = _blocks(0, [100, 37, 250, 1, 90])
    with FeatureSpool(DIM, 10**9) as mem, FeatureSpool(DIM, 64 * ROW_BYTES, spill_dir=tmp_path) as disk:
        for b in blocks:
            mem.append(b.astype(np.float64))  # any float dtype is stored as float32
            disk.append(b)
        assert not mem.spilled and mem.path is None
        assert disk.spilled and disk.n_memory_rows == 64 and disk.n_spilled_rows == 478 - 64
        assert disk.path.parent == tmp_path and disk.path.stat().st_size == disk.n_spilled_rows * ROW_BYTES
        np.testing.assert_array_equal(np.concatenate(list(disk.iter_chunks(50))), mem.to_array())
        np.testing.assert_array_equal(mem.to_array(), np.concatenate(blocks))
        path = disk.path
    assert not path.exists()


def test_file_is_removed_when_the_with_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), FeatureSpool(DIM, 0, spill_dir=tmp_path) as spool:
        spool.append(_blocks(1, [10])[0])
        assert spool.path.exists() and spool.n_memory_rows == 0
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_file_is_removed_on_garbage_collection(tmp_path):
    spool = FeatureSpool(DIM, 0, spill_dir=tmp_path)
    spool.append(_blocks(2, [5])[0])
    assert len(list(tmp_path.iterdir())) == 1
    del spool
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_appending_after_a_read_keeps_the_order(tmp_path):
    a, b, c = _blocks(3, [30, 30, 30])
    with FeatureSpool(DIM, 20 * ROW_BYTES, spill_dir=tmp_path) as spool:
        spool.append(a)
        np.testing.assert_array_equal(spool.to_array(), a)  # maps the file at 10 spilled rows
        spool.append(b)
        spool.append(c)
        np.testing.assert_array_equal(spool.to_array(), np.concatenate([a, b, c]))


def test_radius_estimate_reads_a_spilled_spool(tmp_path):
    x = np.random.default_rng(4).standard_normal((900, DIM)).astype(np.float32)
    with FeatureSpool(DIM, 200 * ROW_BYTES, spill_dir=tmp_path) as spool:
        for part in np.array_split(x, 7):
            spool.append(part)
        assert spool.spilled
        for q in (300, 900):
            assert estimate_radius(spool, max_queries=q, seed=1) == estimate_radius(x, max_queries=q, seed=1)


def test_bad_input_and_use_after_close(tmp_path):
    with pytest.raises(InputError, match="dim"):
        FeatureSpool(0, 10)
    with pytest.raises(InputError, match="max_memory_bytes"):
        FeatureSpool(DIM, -1)
    with pytest.raises(InputError, match="not a directory"):
        FeatureSpool(DIM, 10, spill_dir=tmp_path / "missing")
    spool = FeatureSpool(DIM, 10)
    with pytest.raises(InputError, match=r"shape \[n, 6\]"):
        spool.append(np.zeros((3, DIM + 1), np.float32))
    with pytest.raises(InputTypeError, match="floating"):
        spool.append(np.zeros((3, DIM), np.int32))
    with pytest.raises(InputTypeError, match="numpy array"):
        spool.append([[0.0] * DIM])
    spool.append(np.zeros((2, DIM), np.float32))
    with pytest.raises(InputError, match="positions"):
        spool.take(np.array([2]))
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(NotFittedError, match="closed"):
        spool.append(np.zeros((1, DIM), np.float32))
