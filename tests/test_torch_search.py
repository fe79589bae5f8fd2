"""The torch search (the CUDA store without faiss-gpu), run on CPU tensors.

``ClusterBank(device="cpu", gpu_search="torch")`` runs the same :class:`TorchStore`
code a CUDA bank runs with faiss-cpu: GEMM + topk candidates, host decisions,
device means. It is checked against the plain Algorithm 1 (tests/reference.py),
against ``faiss.knn`` and against the faiss CPU store.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ocbank import ClusterBank, Detector
from ocbank.config import from_dict
from ocbank.engine import bank as bank_mod
from ocbank.engine import store as store_mod
from ocbank.engine._faiss import faiss
from ocbank.engine.checkpoint import read_metadata
from ocbank.engine.device import resolve_device
from ocbank.engine.knn import rerank_exact, torch_knn
from ocbank.engine.store import CpuStore, TorchStore, resolve_search
from ocbank.errors import ConfigError, DeviceError, InputError

from .conftest import STREAMS, assert_close_across_runs, clustered, tiny_config
from .reference import reference_bank
from .test_engine_m2 import m2_tolerance


def torch_bank(dim: int, radius: float, precision: str = "fp32", **kw) -> ClusterBank:
    return ClusterBank(dim, radius, device="cpu", gpu_search="torch", gpu_search_precision=precision, **kw)


def add_in_batches(bank: ClusterBank, X: np.ndarray, batch: int = 97) -> ClusterBank:
    for start in range(0, len(X), batch):
        bank.add(torch.from_numpy(X[start : start + batch]))
    return bank


def test_torch_bank_on_cpu_equals_reference(stream):
    X, radius = stream
    ref = reference_bank(X, radius)
    bank = add_in_batches(torch_bank(X.shape[1], radius), X)
    assert isinstance(bank.store_, TorchStore) and bank.store_.search_backend == "torch"
    np.testing.assert_array_equal(bank.counts, ref.counts)
    np.testing.assert_allclose(bank.means, ref.means, rtol=0, atol=1e-5)
    assert (np.abs(bank.m2 - ref.m2) <= m2_tolerance(X, ref.counts, 1e-6)).all()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", [pytest.param("clustered", marks=pytest.mark.slow), "sparse", "exact_radius_and_ties"])
def test_half_precision_candidates_build_the_fp32_bank(name, precision):
    """Candidates in fp16/bf16, decisions re-checked in fp32: the same bank on well-separated data."""
    make, radius = STREAMS[name]
    X = make()
    exact = add_in_batches(torch_bank(X.shape[1], radius), X)
    half = add_in_batches(torch_bank(X.shape[1], radius, precision), X)
    np.testing.assert_array_equal(half.counts, exact.counts)
    np.testing.assert_allclose(half.means, exact.means, rtol=0, atol=1e-5)
    assert half.search_backend == {"device": "cpu", "search": "torch", "precision": precision}


@pytest.mark.slow
def test_capped_torch_bank_equals_capped_reference():
    X = clustered(1200, 16, 90, 3.0, 0.4, 5)
    ref = reference_bank(X, 0.6, max_centroids=40)
    bank = add_in_batches(torch_bank(16, 0.6, max_centroids=40), X, 150)
    assert len(bank) <= 40
    np.testing.assert_array_equal(bank.counts, ref.counts)
    np.testing.assert_allclose(bank.means, ref.means, rtol=0, atol=1e-5)
    assert bank.radius_ == pytest.approx(ref.radius) and len(bank.radius_history_) == len(ref.history)
    assert (np.abs(bank.m2 - ref.m2) <= m2_tolerance(X, ref.counts, 1e-6)).all()


@pytest.mark.parametrize("k", [1, 5])
def test_torch_search_matches_faiss_knn(k):
    X = clustered(3000, 48, 150, 3.0, 0.6, 6)
    bank = torch_bank(48, 1.0).add(X)
    q = clustered(800, 48, 150, 3.0, 0.8, 7)
    d_ref, i_ref = faiss.knn(q, bank.means, k)
    d, ids = bank.search(torch.from_numpy(q), k=k)
    assert (ids == i_ref).mean() > 0.999
    np.testing.assert_allclose(d**2, d_ref, rtol=1e-4, atol=1e-4 * float(d_ref.max()))
    # And the whole bank agrees with the faiss CPU store on the same stream.
    cpu = ClusterBank(48, 1.0).add(X)
    np.testing.assert_array_equal(bank.counts, cpu.counts)
    np.testing.assert_allclose(bank.means, cpu.means, rtol=0, atol=1e-5)


def test_torch_knn_blocks_stay_under_the_bound_and_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(8)
    means = torch.from_numpy(rng.standard_normal((300, 32)).astype(np.float32))
    queries = torch.from_numpy(rng.standard_normal((50, 32)).astype(np.float32))
    norms = (means.double() ** 2).sum(1)
    whole_d, whole_i = torch_knn(queries, means, norms, 4)
    blocks = []
    real_addmm = torch.addmm

    def spy(bias, a, b, **kw):
        blocks.append((a.shape[0], b.shape[1], a.element_size()))
        return real_addmm(bias, a, b, **kw)

    monkeypatch.setattr(torch, "addmm", spy)
    bound = 40 * 4  # 40 fp32 columns: 8 column blocks and one query row per block
    d, i = torch_knn(queries, means, norms, 4, block_bytes=bound)
    assert len(blocks) == 50 * 8
    assert max(r * c * s for r, c, s in blocks) <= bound
    np.testing.assert_array_equal(i.numpy(), whole_i.numpy())
    assert_close_across_runs(d.numpy(), whole_d.numpy())  # other GEMM block shapes: other summation order
    brute = ((queries.double()[:, None] - means.double()[None]) ** 2).sum(2)
    np.testing.assert_array_equal(i.numpy(), torch.topk(brute, 4, dim=1, largest=False).indices.numpy())


@pytest.mark.slow
def test_a_tiny_block_bound_builds_and_searches_the_same_bank(monkeypatch):
    X = clustered(1500, 32, 60, 3.0, 0.6, 9)
    q = clustered(300, 32, 60, 3.0, 0.8, 10)
    default = add_in_batches(torch_bank(32, 1.2), X, 500)
    monkeypatch.setattr(store_mod, "SEARCH_BLOCK_BYTES", 16 * 4 * 4)  # 16 columns x 4 rows of fp32
    tiny = add_in_batches(torch_bank(32, 1.2), X, 500)
    assert tiny.store_.block_bytes == 256
    np.testing.assert_array_equal(tiny.counts, default.counts)
    np.testing.assert_allclose(tiny.means, default.means, rtol=0, atol=1e-6)
    d0, i0 = default.search(q, k=3)
    d1, i1 = tiny.search(q, k=3)
    np.testing.assert_array_equal(i1, i0)
    assert_close_across_runs(d1, d0)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_search_recall_at_1_against_exact(precision):
    """Random queries between centroids: raw bf16 ranks miss often; the fp32 re-ranking recovers them."""
    rng = np.random.default_rng(11)
    centroids = (rng.standard_normal((8000, 128)) + 3.0).astype(np.float32)
    queries = (rng.standard_normal((1000, 128)) + 3.0).astype(np.float32)
    bank = torch_bank(128, 1e-3, precision)
    bank.load_state(ClusterBank(128, 1e-3).add(centroids).state())
    assert len(bank) == 8000 and bank.store_.precision == precision
    _, exact = faiss.knn(queries, centroids, 1)
    dist, ids = bank.search(queries)
    assert (ids[:, 0] == exact[:, 0]).mean() >= 0.995
    # The re-ranked distances are exact fp32 ones, not half-precision ones.
    true = ((queries.astype(np.float64) - centroids[ids[:, 0]]) ** 2).sum(1)
    np.testing.assert_allclose(dist[:, 0] ** 2, true, rtol=1e-5)
    # Without the re-ranking (the candidates' own order) recall@1 is measurably lower in bf16.
    mt = torch.from_numpy(centroids)
    raw = torch_knn(torch.from_numpy(queries), mt, (mt.double() ** 2).sum(1), 16, precision)[1]
    reranked = rerank_exact(torch.from_numpy(queries), mt, raw, 1)[1]
    np.testing.assert_array_equal(reranked.numpy(), ids)
    if precision == "bf16":
        assert (raw[:, 0].numpy() == exact[:, 0]).mean() < 0.95


def test_fp16_search_does_not_overflow_on_large_features():
    """Dot products of 1e3-scale features pass fp16's 65504: the inputs are scaled first."""
    X = clustered(400, 64, 20, 3.0, 0.5, 12) * 500.0
    bank = torch_bank(64, 250.0, "fp16").add(X)
    ref = ClusterBank(64, 250.0).add(X)
    np.testing.assert_array_equal(bank.counts, ref.counts)
    d, ids = bank.search(X[:50])
    assert np.isfinite(d).all()
    np.testing.assert_array_equal(ids, ref.search(X[:50])[1])


@pytest.mark.parametrize("writer", ["torch", "faiss"])
def test_checkpoints_cross_between_torch_and_cpu_stores(tmp_path, writer):
    X = clustered(2000, 24, 50, 3.0, 0.6, 13)
    first, rest = X[:1200], X[1200:]
    reader = "faiss" if writer == "torch" else "torch"
    # cpu_search pinned: "auto" picks the faster CPU search of this machine, which a test must not depend on.
    built = ClusterBank(24, 1.5, gpu_search=writer, cpu_search="faiss").add(first)
    built.save(tmp_path / "b.h5")
    loaded = ClusterBank.load(tmp_path / "b.h5", gpu_search=reader, cpu_search="faiss")
    assert loaded.search_backend["search"] == reader
    np.testing.assert_array_equal(loaded.counts, built.counts)
    np.testing.assert_array_equal(loaded.means, built.means)
    np.testing.assert_array_equal(loaded.m2, built.m2)
    # Both continue the stream to the uninterrupted reference.
    ref = reference_bank(X, 1.5)
    for bank in (loaded.add(rest), built.add(rest)):
        np.testing.assert_array_equal(bank.counts, ref.counts)
        np.testing.assert_allclose(bank.means, ref.means, rtol=0, atol=1e-5)


def test_store_choice_follows_device_and_gpu_search(monkeypatch):
    assert isinstance(ClusterBank(4, 1.0).add(np.eye(4)).store_, CpuStore)
    assert isinstance(ClusterBank(4, 1.0, gpu_search="faiss").add(np.eye(4)).store_, CpuStore)
    assert isinstance(ClusterBank(4, 1.0, gpu_search="torch").add(np.eye(4)).store_, TorchStore)
    monkeypatch.setattr(store_mod, "faiss_has_gpu", lambda: False)
    assert resolve_search("auto", "cuda") == "torch"
    assert resolve_search("torch", "cuda:1", "bf16") == "torch"
    with pytest.raises(DeviceError, match="gpu_search='torch'"):
        resolve_search("faiss", "cuda")
    monkeypatch.setattr(store_mod, "faiss_has_gpu", lambda: True)
    assert resolve_search("auto", "cuda") == "faiss"
    assert resolve_search("auto", "cuda", "fp16") == "torch"  # faiss searches fp32 only here
    assert resolve_search("auto", "cpu") == "faiss"


@pytest.mark.parametrize(
    "kwargs",
    [{"gpu_search": "cublas"}, {"gpu_search_precision": "fp8"}, {"gpu_search": "faiss", "gpu_search_precision": "bf16"},
     {"cpu_search": "mkl"}],
)
def test_bad_search_options_are_refused_by_name(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        ClusterBank(8, 1.0, **kwargs)


def test_cuda_bank_needs_no_faiss_gpu_resources(monkeypatch):
    """With a CUDA torch and faiss-cpu, device='cuda' builds a torch-search store (no StandardGpuResources)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(store_mod, "faiss_has_gpu", lambda: False)
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    made = []

    def store_on_cpu(dim, radius, device, n_candidates=16, *, search, precision):
        made.append((device, search, precision))
        return TorchStore(dim, radius, "cpu", n_candidates, search=search, precision=precision)

    monkeypatch.setattr(bank_mod, "TorchStore", store_on_cpu)
    assert resolve_device("cuda") == "cuda"
    X = clustered(500, 16, 10, 3.0, 0.5, 14)
    bank = ClusterBank(16, 2.0, device="cuda").add(X)
    assert made == [("cuda", "torch", "fp32")]
    np.testing.assert_array_equal(bank.counts, reference_bank(X, 2.0).counts)


def test_config_carries_the_search_options():
    cfg = from_dict({"bank": {"gpu_search": "torch", "gpu_search_precision": "bf16"}}, require_root=False)
    assert (cfg.bank.gpu_search, cfg.bank.gpu_search_precision) == ("torch", "bf16")
    assert cfg.to_dict()["bank"]["gpu_search_precision"] == "bf16"
    for bad in ({"gpu_search": "cuda"}, {"gpu_search_precision": "half"}, {"gpu_search": "faiss", "gpu_search_precision": "fp16"}):
        with pytest.raises(ConfigError, match="bank.gpu_search"):
            from_dict({"bank": bad}, require_root=False)


def test_every_bank_a_config_makes_takes_its_search_options():
    from ocbank.jobs.build import merge_shards
    from ocbank.model.builder import BankBuilder, new_bank

    options = {"search_index": "flat", "gpu_search": "torch", "gpu_search_precision": "bf16", "cpu_search": "faiss"}
    cfg = from_dict({"bank": {**options, "radius": 1.0}}, require_root=False)
    assert cfg.bank.search_options == options
    banks = (new_bank(cfg, 1.0), BankBuilder(cfg, 1).bank, merge_shards([], 1.0, "cpu", **cfg.bank.search_options))
    for bank in banks:
        assert bank.search_index == "flat" and bank.cpu_search == "faiss"
        assert bank.search_backend == {"device": "cpu", "search": "torch", "precision": "bf16"}


def test_repr_names_the_backend():
    bank = torch_bank(8, 1.0, "bf16").add(np.eye(8, dtype=np.float32))
    assert "gpu_search='torch'" in repr(bank) and "bf16" in repr(bank)
    assert "gpu_search" not in repr(ClusterBank(8, 1.0))


@pytest.mark.slow
def test_detector_on_the_torch_search_matches_the_faiss_store_and_records_it(tiny_mvtec, extractor, tmp_path):
    """Detector fit/predict through the torch store: maps within 1e-3 of their range; the file names the backend."""
    train = [str(p) for p in sorted((tiny_mvtec / "weave" / "train" / "good").glob("*.png"))]
    test = [str(p) for p in sorted((tiny_mvtec / "weave" / "test").rglob("*.png"))[:4]]
    cfg = tiny_config(tiny_mvtec, bank={"radius": 5.0})
    plain = Detector.from_config(cfg, extractor=extractor).fit(train)
    torch_cfg = tiny_config(tiny_mvtec, bank={"radius": 5.0, "gpu_search": "torch", "gpu_search_precision": "bf16"})
    det = Detector.from_config(torch_cfg, extractor=extractor).fit(train)
    assert isinstance(det.bank.store_, TorchStore)
    np.testing.assert_array_equal(det.bank.counts, plain.bank.counts)
    a, b = plain.predict(test), det.predict(test)
    span = float(a.maps.max() - a.maps.min())
    assert np.abs(a.maps - b.maps).max() <= 1e-3 * span
    det.save(tmp_path / "det.h5")
    again = Detector.load(tmp_path / "det.h5")
    assert read_metadata(tmp_path / "det.h5")["search_backend"] == {"device": "cpu", "search": "torch", "precision": "bf16"}
    assert again.bank.search_backend["search"] == "torch"  # the config's gpu_search comes back with it
