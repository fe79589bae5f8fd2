"""CPU and GPU banks agree (skipped without CUDA and a GPU faiss build)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ocbank import ClusterBank
from ocbank.engine.device import cuda_available

from .conftest import assert_close_across_runs, clustered

pytestmark = pytest.mark.skipif(not cuda_available(), reason="needs CUDA and a faiss GPU build")


def test_cpu_and_gpu_build_equal_banks():
    X = clustered(20_000, 64, 300, 3.0, 0.8, 0)
    cpu = ClusterBank(64, 6.0, device="cpu")
    gpu = ClusterBank(64, 6.0, device="cuda")
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


def test_gpu_bank_saves_and_loads_on_cpu(tmp_path):
    X = clustered(3000, 32, 40, 3.0, 0.5, 2)
    gpu = ClusterBank(32, 3.0, device="cuda").add(X)
    gpu.save(tmp_path / "g.h5")
    cpu = ClusterBank.load(tmp_path / "g.h5", device="cpu")
    np.testing.assert_array_equal(cpu.counts, gpu.counts)


def test_gpu_m2_and_cap_match_cpu():
    X = clustered(5000, 32, 200, 3.0, 0.5, 3)
    cpu = ClusterBank(32, 0.5, device="cpu", max_centroids=60)
    gpu = ClusterBank(32, 0.5, device="cuda", max_centroids=60)
    for start in range(0, len(X), 784):
        cpu.add(X[start : start + 784])
        gpu.add(torch.from_numpy(X[start : start + 784]).cuda())
        assert len(gpu) <= 60
    np.testing.assert_array_equal(gpu.counts, cpu.counts)
    assert gpu.radius == cpu.radius and gpu.radius_history_ == cpu.radius_history_
    scale = 1e-6 * cpu.counts * float((X.astype(np.float64) ** 2).sum(1).mean())
    assert (np.abs(gpu.m2 - cpu.m2) <= scale).all()
