"""Inputs at the door: dtypes converted to float32, k bounded, radius checked, ocbank error classes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ocbank import ClusterBank
from ocbank.engine.bank import MAX_K
from ocbank.errors import DeviceError, InputError, InputTypeError, OcbankError

from .conftest import clustered


def same_bank(a: ClusterBank, b: ClusterBank) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.m2, b.m2)


@pytest.mark.parametrize(
    "convert",
    [
        lambda X: torch.from_numpy(X).to(torch.bfloat16),
        lambda X: torch.from_numpy(X).to(torch.float16),
        lambda X: torch.from_numpy(X).to(torch.float64),
        lambda X: X.astype(np.float16),
        lambda X: X.astype(np.float64),
    ],
    ids=["torch-bf16", "torch-f16", "torch-f64", "numpy-f16", "numpy-f64"],
)
def test_low_and_high_precision_inputs_become_float32(convert):
    X = clustered(300, 16, 5, 3.0, 0.5, 9)
    x = convert(X)
    # The reference: the same values, rounded to the input dtype, handed over as float32.
    as_f32 = (x.float().numpy() if isinstance(x, torch.Tensor) else x.astype(np.float32))
    got = ClusterBank(16, 2.0).add(x)
    same_bank(got, ClusterBank(16, 2.0).add(as_f32))
    dist, ids = got.search(convert(X[:20]), k=2)
    ref_d, ref_i = got.search(as_f32[:20], k=2)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_array_equal(dist, ref_d)


def test_huge_k_is_refused_without_allocating():
    bank = ClusterBank(4, 1.0).add(clustered(50, 4, 3, 3.0, 0.2, 0))
    q = np.zeros((10_000, 4), np.float32)
    began = time.perf_counter()
    with pytest.raises(InputError, match=r"1\.\.2048, got 1000000000") as info:
        bank.search(q, k=10**9)
    assert time.perf_counter() - began < 1.0
    assert isinstance(info.value, ValueError)
    with pytest.raises(InputError, match="2049"):
        bank.search(q, k=MAX_K + 1)
    dist, ids = bank.search(q[:2], k=MAX_K)  # the limit itself is fine and pads as before
    assert ids.shape == (2, MAX_K) and (ids[:, len(bank):] == -1).all() and np.isinf(dist[:, len(bank):]).all()


@pytest.mark.parametrize("radius", [1e200, 1e-200, 1.5e154])
def test_radius_whose_square_overflows_or_underflows_is_refused(radius):
    with pytest.raises(InputError, match="radius") as info:
        ClusterBank(4, radius)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, OverflowError)


def test_largest_and_smallest_accepted_radius_work():
    for radius in (1e150, 1e-150):
        bank = ClusterBank(2, radius).add(np.array([[0.0, 0.0], [1.0, 0.0]]))
        assert len(bank) == (1 if radius > 1 else 2)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"dim": 0, "radius": 1.0}, InputError),
        ({"dim": 2.5, "radius": 1.0}, InputTypeError),
        ({"dim": 4, "radius": "26"}, InputTypeError),
        ({"dim": 4, "radius": float("nan")}, InputError),
        ({"dim": 4, "radius": 1.0, "device": "tpu"}, InputError),
    ],
)
def test_construction_errors_are_ocbank_errors(kwargs, error):
    with pytest.raises(error):
        ClusterBank(**kwargs)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (np.zeros((2, 5), np.float32), InputError),
        (np.zeros((2, 4), bool), InputTypeError),
        (torch.zeros((2, 4), dtype=torch.complex64), InputTypeError),
        (np.full((2, 4), np.nan), InputError),
    ],
)
def test_bad_rows_raise_ocbank_errors_that_keep_the_builtin_base(bad, error):
    bank = ClusterBank(4, 1.0)
    with pytest.raises(error) as info:
        bank.add(bad)
    assert isinstance(info.value, OcbankError) and isinstance(info.value, ValueError)


def test_missing_cuda_is_a_device_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="device='cuda:1'"):
        ClusterBank(4, 1.0, device="cuda:1").add(np.zeros((1, 4), np.float32))
