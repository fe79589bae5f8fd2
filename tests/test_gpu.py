"""CPU and GPU banks agree (skipped without CUDA).

Every test runs with the torch search (what faiss-cpu gives a CUDA machine) and, when the
faiss GPU build is present, with ``faiss.knn_gpu`` too. The same torch-search code is
tested on CPU tensors in tests/test_torch_search.py, so it runs in CI without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ocbank import ClusterBank
from ocbank.engine._faiss import faiss_has_gpu
from ocbank.engine.device import cuda_available

from .conftest import assert_close_across_runs, clustered

pytestmark = pytest.mark.skipif(not cuda_available(), reason="needs CUDA")

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_has_gpu(), reason="faiss-cpu"))]


@pytest.fixture(params=BACKENDS)
def gpu_search(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cpu_and_gpu_build_equal_banks(gpu_search, precision):
    if gpu_search == "faiss" and precision != "fp32":
        pytest.skip("faiss searches fp32 only")
    X = clustered(20_000, 64, 300, 3.0, 0.8, 0)
    cpu = ClusterBank(64, 6.0, device="cpu")
    gpu = ClusterBank(64, 6.0, device="cuda", gpu_search=gpu_search, gpu_search_precision=precision)
    for start in range(0, len(X), 784):
        cpu.add(X[start : start + 784])
        gpu.add(torch.from_numpy(X[start : start + 784]).cuda())
    np.testing.assert_array_equal(gpu.counts, cpu.counts)
    assert_close_across_runs(gpu.means, cpu.means)
    q = clustered(2000, 64, 300, 3.0, 0.8, 1)
    d_cpu, i_cpu = cpu.search(q)
    d_gpu, i_gpu = gpu.search(torch.from_numpy(q).cuda())
    assert (i_cpu == i_gpu).mean() > 0.999
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-3, atol=1e-3)


def test_gpu_bank_saves_and_loads_on_cpu(tmp_path, gpu_search):
    X = clustered(3000, 32, 40, 3.0, 0.5, 2)
    gpu = ClusterBank(32, 3.0, device="cuda", gpu_search=gpu_search).add(X)
    assert gpu.search_backend["search"] == gpu_search
    gpu.save(tmp_path / "g.h5")
    cpu = ClusterBank.load(tmp_path / "g.h5", device="cpu")
    np.testing.assert_array_equal(cpu.counts, gpu.counts)
    np.testing.assert_array_equal(cpu.means, gpu.means)


def test_cpu_bank_loads_on_gpu_and_continues_equal(tmp_path, gpu_search):
    X = clustered(4000, 32, 40, 3.0, 0.5, 4)
    ClusterBank(32, 3.0).add(X[:2000]).save(tmp_path / "c.h5")
    gpu = ClusterBank.load(tmp_path / "c.h5", device="cuda", gpu_search=gpu_search).add(X[2000:])
    cpu = ClusterBank(32, 3.0).add(X)
    np.testing.assert_array_equal(gpu.counts, cpu.counts)
    assert_close_across_runs(gpu.means, cpu.means)


def test_gpu_m2_and_cap_match_cpu(gpu_search):
    X = clustered(5000, 32, 200, 3.0, 0.5, 3)
    cpu = ClusterBank(32, 0.5, device="cpu", max_centroids=60)
    gpu = ClusterBank(32, 0.5, device="cuda", max_centroids=60, gpu_search=gpu_search)
    for start in range(0, len(X), 784):
        cpu.add(X[start : start + 784])
        gpu.add(torch.from_numpy(X[start : start + 784]).cuda())
        assert len(gpu) <= 60
    np.testing.assert_array_equal(gpu.counts, cpu.counts)
    assert gpu.radius_ == cpu.radius_ and gpu.radius_history_ == cpu.radius_history_
    scale = 1e-6 * cpu.counts * float((X.astype(np.float64) ** 2).sum(1).mean())
    assert (np.abs(gpu.m2 - cpu.m2) <= scale).all()
