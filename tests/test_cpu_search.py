"""The CPU store's three GEMMs (``cpu_search: faiss | torch | numpy``) and the measured ``auto`` choice.

Every search must build the plain Algorithm 1 bank (tests/reference.py) on every conftest
stream and answer like ``faiss.knn``; ``auto`` measures once, caches the choice per machine
under $OCBANK_CACHE_DIR (atomically), and the choice is recorded wherever ``gpu_search``'s is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ocbank import ClusterBank
from ocbank.config import from_dict
from ocbank.engine import cpu_search
from ocbank.engine import knn as engine_knn
from ocbank.engine._faiss import faiss
from ocbank.engine.kernel import NEAR_TIE_REL
from ocbank.engine.knn import CPU_SEARCH_BACKENDS, numpy_knn
from ocbank.engine.store import CpuStore
from ocbank.errors import ConfigError, InputError
from ocbank.model.radius import estimate_radius

from .conftest import STREAMS, assert_close_across_runs, clustered
from .reference import reference_bank
from .test_engine_m2 import m2_tolerance

ROOT = Path(__file__).resolve().parents[1]
GENERIC_FAISS_BLAS = cpu_search.generic_faiss_blas


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder, no in-process memo, and the measurement path (the rule tested on its own)."""
    monkeypatch.setenv(cpu_search.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(cpu_search.CHOICE_ENV, raising=False)  # conftest pins the choice for the other tests
    monkeypatch.setattr(cpu_search, "generic_faiss_blas", lambda: None)
    monkeypatch.setattr(cpu_search, "_memo", {})
    monkeypatch.setattr(cpu_search, "MEASURE_SHAPE", (16, 64, 32))  # keep the measurement short in tests
    return tmp_path / "cache"


def add_in_batches(bank: ClusterBank, X: np.ndarray, batch: int = 97) -> ClusterBank:
    for start in range(0, len(X), batch):
        bank.add(X[start : start + batch])
    return bank


@pytest.mark.parametrize("search", CPU_SEARCH_BACKENDS)
def test_every_cpu_search_builds_the_reference_bank(stream, search):
    X, radius = stream
    ref = reference_bank(X, radius)
    bank = add_in_batches(ClusterBank(X.shape[1], radius, cpu_search=search), X)
    assert isinstance(bank.store_, CpuStore) and bank.search_backend["search"] == search
    np.testing.assert_array_equal(bank.counts, ref.counts)
    np.testing.assert_allclose(bank.means, ref.means, rtol=0, atol=1e-5)
    assert (np.abs(bank.m2 - ref.m2) <= m2_tolerance(X, ref.counts, 1e-6)).all()


@pytest.mark.parametrize("search", ["torch", "numpy"])
@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("k", [1, 3])
def test_torch_and_numpy_cpu_searches_answer_like_faiss_knn(name, k, search):
    make, radius = STREAMS[name]
    X = make()
    bank = ClusterBank(X.shape[1], radius, cpu_search=search).add(X)
    queries = np.concatenate([X[::3], X[::5] + 0.01])
    d_ref, i_ref = faiss.knn(queries, np.ascontiguousarray(bank.means), min(k, len(bank)))
    d, ids = bank.search(queries, k=k)
    kk = min(k, len(bank))
    # Both sides form ||q||^2 - 2 q mu + ||mu||^2 in fp32: each within the engine's near-tie band of the
    # exact value (a band in units of ||q||^2 + ||mu||^2), so within two bands of each other.
    band = 2 * NEAR_TIE_REL * ((queries.astype(np.float64) ** 2).sum(1) + (bank.means.astype(np.float64) ** 2).sum(1).max())
    # Equal distances (duplicated rows, ties) may list their ids in another order: compare the ids'
    # true distances, and the first neighbour wherever it is unique.
    true = ((queries[:, None, :].astype(np.float64) - bank.means[ids[:, :kk]]) ** 2).sum(2)
    assert (np.abs(true - d_ref) <= band[:, None]).all()
    assert (np.abs(d[:, :kk].astype(np.float64) ** 2 - d_ref) <= band[:, None]).all()
    gap = np.diff(np.sort(((queries[:, None, :] - bank.means[None]) ** 2).sum(2), axis=1)[:, :2], axis=1)[:, 0] \
        if len(bank) > 1 else np.ones(len(queries))
    clear = gap > 1e-3 * float(d_ref.max() + 1)
    np.testing.assert_array_equal(ids[clear, 0], i_ref[clear, 0])


@pytest.mark.parametrize("search", ["torch", "numpy"])
def test_torch_and_numpy_cpu_searches_take_read_only_and_large_queries(search):
    X = clustered(2000, 24, 40, 3.0, 0.5, 11)
    bank = ClusterBank(24, 1.5, cpu_search=search).add(X)
    q = clustered(500, 24, 40, 3.0, 0.6, 12)
    q.flags.writeable = False  # a memory-mapped feature file
    d, ids = bank.search(q)
    d_ref, i_ref = faiss.knn(np.array(q), np.ascontiguousarray(bank.means), 1)
    assert (ids[:, 0] == i_ref[:, 0]).mean() > 0.999
    assert_close_across_runs(d[:, 0] ** 2, d_ref[:, 0])


@pytest.mark.parametrize("search", ["torch", "numpy"])
def test_capped_torch_and_numpy_cpu_banks_equal_the_capped_reference(search):
    X = clustered(900, 16, 90, 3.0, 0.4, 5)
    ref = reference_bank(X, 0.6, max_centroids=40)
    bank = add_in_batches(ClusterBank(16, 0.6, max_centroids=40, cpu_search=search), X, 150)
    np.testing.assert_array_equal(bank.counts, ref.counts)
    np.testing.assert_allclose(bank.means, ref.means, rtol=0, atol=1e-5)
    assert bank.radius_ == pytest.approx(ref.radius)  # the cap grows the fitted radius_; radius stays as given


def test_auto_measures_once_and_caches_the_choice(fresh_cache, monkeypatch):
    bank = ClusterBank(8, 1.0).add(np.eye(8, dtype=np.float32))
    files = list((fresh_cache / "cpu_search").glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["choice"] in CPU_SEARCH_BACKENDS and record["key"] == cpu_search.machine_key()
    assert bank.search_backend["search"] == record["choice"]
    assert f"searched with {record['choice']}" in repr(bank)
    # A new process reads the file instead of measuring.
    monkeypatch.setattr(cpu_search, "_memo", {})
    monkeypatch.setattr(cpu_search, "measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
    again = cpu_search.auto_cpu_search()
    assert again["source"] == "cache" and again["choice"] == record["choice"]


def _slow_down(monkeypatch, *searches: str) -> None:
    """Make the named searches' ranking 0.25 s slower: far above any noise of a loaded machine on the tiny shape."""
    for search in searches:
        owner, name = {"faiss": (cpu_search.faiss, "knn"), "torch": (engine_knn, "torch_knn"),
                       "numpy": (engine_knn, "numpy_knn")}[search]
        real = getattr(owner, name)

        def slow(*args, _real=real, **kw):
            time.sleep(0.25)
            return _real(*args, **kw)

        monkeypatch.setattr(owner, name, slow)


@pytest.mark.parametrize(("slow", "fastest"), [(("faiss", "torch"), "numpy"), (("numpy", "faiss"), "torch"),
                                               (("numpy", "torch"), "faiss")])
def test_auto_picks_the_fastest_search(fresh_cache, monkeypatch, slow, fastest):
    _slow_down(monkeypatch, *slow)
    picked = cpu_search.measure()
    assert picked["choice"] == fastest
    assert all(picked[f"{fastest}_knn_gflops"] > picked[f"{s}_knn_gflops"] for s in slow)


def test_a_changed_machine_or_a_bad_file_is_measured_again(fresh_cache, monkeypatch):
    cpu_search.auto_cpu_search()
    path = next((fresh_cache / "cpu_search").glob("*.json"))
    path.write_text("{not json")
    monkeypatch.setattr(cpu_search, "_memo", {})
    assert cpu_search.auto_cpu_search()["source"] == "measured"
    assert json.loads(path.read_text())["choice"] in CPU_SEARCH_BACKENDS  # rewritten whole
    # A user-set OpenBLAS core type is another machine as far as the choice goes.
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    assert cpu_search.cached_choice() is None


def test_the_cache_follows_xdg_and_an_unwritable_one_only_costs_a_measurement(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(cpu_search.CACHE_ENV)
    monkeypatch.delenv(cpu_search.CHOICE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_search.cache_dir() == tmp_path / "xdg" / "ocbank"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid per the XDG spec: ignored
    assert cpu_search.cache_dir() == Path.home() / ".cache" / "ocbank"
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(cpu_search.CACHE_ENV, str(blocker))  # a file where the folder should be
    monkeypatch.setattr(cpu_search, "_memo", {})
    monkeypatch.setattr(cpu_search, "MEASURE_SHAPE", (16, 64, 32))
    monkeypatch.setattr(cpu_search, "generic_faiss_blas", lambda: None)
    with caplog.at_level("WARNING"):
        record = cpu_search.auto_cpu_search()
    assert record["choice"] in CPU_SEARCH_BACKENDS and "could not cache" in caplog.text


@pytest.mark.slow
def test_concurrent_processes_leave_one_whole_cache_file(tmp_path):
    code = (
        "from ocbank.engine import cpu_search\n"
        "cpu_search.MEASURE_SHAPE = (16, 64, 32)\n"
        "cpu_search.generic_faiss_blas = lambda: None  # the measurement path, whatever this CPU's faiss BLAS\n"
        "print(cpu_search.auto_cpu_search()['choice'])\n"
    )
    env = {**os.environ, cpu_search.CACHE_ENV: str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop(cpu_search.CHOICE_ENV, None)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=240)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4 and set(outs) <= set(CPU_SEARCH_BACKENDS)
    files = list((tmp_path / "cpu_search").iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["choice"] in outs  # no temp file left behind


def test_cpu_search_option_is_validated_and_carried():
    with pytest.raises(InputError, match="cpu_search.*'numpy'"):
        ClusterBank(8, 1.0, cpu_search="blas")
    with pytest.raises(ConfigError, match="bank.cpu_search.*'numpy'"):
        from_dict({"bank": {"cpu_search": "mkl"}}, require_root=False)
    with pytest.raises(ConfigError, match="bank.gpu_search"):  # numpy is a CPU search only
        from_dict({"bank": {"gpu_search": "numpy"}}, require_root=False)
    for search in CPU_SEARCH_BACKENDS:
        cfg = from_dict({"bank": {"cpu_search": search}}, require_root=False)
        assert cfg.bank.search_options["cpu_search"] == search
    assert "cpu_search='torch'" in repr(ClusterBank(8, 1.0, cpu_search="torch"))
    assert "cpu_search" not in repr(ClusterBank(8, 1.0))


def test_cpu_search_does_not_change_the_config_key():
    from ocbank.jobs.build import config_key

    a = from_dict({"bank": {"cpu_search": "torch"}}, require_root=False)
    b = from_dict({"bank": {"cpu_search": "faiss"}}, require_root=False)
    assert config_key(a) == config_key(b)  # both build the same bank: a resume may switch


@pytest.mark.parametrize("search", CPU_SEARCH_BACKENDS)
def test_exact_knn_matches_brute_force_and_sees_duplicates_at_zero(search):
    x = clustered(400, 16, 8, 3.0, 0.6, 13)
    x[300] = x[7]  # an exact copy
    d, ids = cpu_search.exact_knn(x, x, 2, search)
    brute = ((x[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(2)
    np.testing.assert_array_equal(np.sort(ids[7]), [7, 300])
    norms = (x.astype(np.float64) ** 2).sum(1)
    band = 2 * NEAR_TIE_REL * (norms[:, None] + norms[ids])  # the GEMM form's error, in ||q||^2 + ||mu||^2
    assert (np.abs(d - np.take_along_axis(brute, ids, 1)) <= band).all()
    # Direct fp32 distances of the returned neighbours, whichever GEMM ranked: a copy is at exactly 0.
    assert d[7].max() == 0.0 and (d[:, 0] == 0).all()


@pytest.mark.parametrize("k", [1, 4])
def test_numpy_knn_ranks_like_brute_force_in_blocks_of_any_size(k):
    rng = np.random.default_rng(8)
    means = rng.standard_normal((300, 32)).astype(np.float32)
    queries = rng.standard_normal((50, 32)).astype(np.float32)
    means[150] = means[20]  # an exact tie, in another column block than its twin under the tight bounds
    queries[0] = means[20]
    norms = (means.astype(np.float64) ** 2).sum(1)
    brute = ((queries.astype(np.float64)[:, None] - means[None]) ** 2).sum(2)
    want = np.argsort(brute, axis=1, kind="stable")[:, :k]
    # Blocks of 40 columns (8 of them, one query row each), of 7 (43, one row each), and one whole block.
    for bound in (40 * 4, 7 * 4, 1 << 20):
        got = numpy_knn(queries, means, norms, k, block_bytes=bound)
        # The twins may be listed in either order for k > 1; for k = 1 the lowest id wins (as torch_knn's row minimum).
        np.testing.assert_array_equal(np.take_along_axis(brute, got, 1), np.take_along_axis(brute, want, 1))
        if k == 1:
            np.testing.assert_array_equal(got, want)
        assert set(got[0, :2]) == ({20} if k == 1 else {20, 150})


def _cpu_store(means: np.ndarray, search: str) -> CpuStore:
    store = CpuStore(means.shape[1], 1.0, search=search)
    store.set_state(means, np.ones(len(means), dtype=np.int64), np.zeros(len(means)))
    return store


@pytest.mark.parametrize("k", [1, 3])
def test_every_cpu_search_returns_the_same_distances_for_the_same_neighbours(k):
    # Large, offset features (like a backbone's): the GEMM form's rounding, which differs between
    # the two BLASes and with a row's place in the batch, is then far above fp32's last bit.
    means = clustered(700, 96, 30, 3.0, 0.8, 21) + 40.0
    queries = clustered(900, 96, 30, 3.0, 0.9, 22) + 40.0
    got = {search: _cpu_store(means, search).search(queries, k) for search in CPU_SEARCH_BACKENDS}
    d_f, i_f = got["faiss"]
    for search in ("torch", "numpy"):
        d_o, i_o = got[search]
        same = (i_f == i_o).all(axis=1)
        assert same.mean() > 0.99  # only exact or near ties may be listed otherwise
        np.testing.assert_array_equal(d_f[same], d_o[same])
    # ... and a query scores the same alone as inside a batch.
    for row in (0, 451, 899):
        np.testing.assert_array_equal(_cpu_store(means, "faiss").search(queries[row : row + 1], k)[0][0], d_f[row])


def test_the_radius_is_the_same_under_every_cpu_search():
    x = clustered(3000, 64, 25, 3.0, 0.7, 23) + 30.0
    x[2500] = x[11]  # a duplicate: its nearest other is at exactly 0 under each
    for max_queries in (4096, 500):  # the exact rule and the sampled estimate
        faiss_est = estimate_radius(x, max_queries=max_queries, search="faiss")
        for search in ("torch", "numpy"):
            other = estimate_radius(x, max_queries=max_queries, search=search)
            assert faiss_est.radius == other.radius
            assert faiss_est.as_stats() == other.as_stats()  # the interval and percentiles too


def test_the_environment_pins_the_auto_choice(fresh_cache, monkeypatch):
    monkeypatch.setattr(cpu_search, "measure", lambda *a, **k: pytest.fail("measured although the choice is pinned"))
    for choice in CPU_SEARCH_BACKENDS:
        monkeypatch.setenv(cpu_search.CHOICE_ENV, choice)
        record = cpu_search.auto_cpu_search()
        assert record == {"choice": choice, "source": "env", "key": cpu_search.machine_key()}
        assert ClusterBank(8, 1.0).add(np.eye(8, dtype=np.float32)).search_backend["search"] == choice
    monkeypatch.setenv(cpu_search.CHOICE_ENV, "mkl")
    with pytest.raises(InputError, match="OCBANK_CPU_SEARCH.*'mkl'"):
        cpu_search.resolve_cpu_search("auto")
    assert not (fresh_cache / "cpu_search").exists()


def _fake_blas(monkeypatch, architecture: str, folder: str = "faiss_cpu.libs") -> None:
    import threadpoolctl

    info = [{"user_api": "blas", "internal_api": "openblas", "version": "0.3.15", "architecture": architecture,
             "filepath": f"/venv/site-packages/{folder}/libopenblaso-r0.so", "num_threads": 2}]
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: info)
    monkeypatch.setattr(cpu_search, "cpu_info", lambda: {"model": "x", "vendor": "x", "flags": ["avx", "avx2"]})
    monkeypatch.setattr(cpu_search, "generic_faiss_blas", GENERIC_FAISS_BLAS)


@pytest.mark.parametrize(("slow", "fastest"), [("torch", "numpy"), ("numpy", "torch")])
def test_a_generic_faiss_blas_on_an_avx2_cpu_leaves_faiss_out_of_the_measurement(fresh_cache, monkeypatch, slow,
                                                                                   fastest):
    _fake_blas(monkeypatch, "Prescott")
    real_knn = faiss.knn
    monkeypatch.setattr(cpu_search.faiss, "knn", lambda *a: pytest.fail("measured faiss although the rule rules it out"))
    _slow_down(monkeypatch, slow)
    record = cpu_search.auto_cpu_search()
    assert record["choice"] == fastest and record["source"] == "rule"
    assert record["generic_blas"]["architecture"] == "Prescott" and "faiss_knn_gflops" not in record
    # The next process reads the choice back while the rule still holds ...
    monkeypatch.setattr(cpu_search, "_memo", {})
    again = cpu_search.auto_cpu_search()
    assert again["source"] == "cache" and again["choice"] == fastest
    # ... but not once faiss's BLAS fits the CPU (the same key: the rule is read each process).
    _fake_blas(monkeypatch, "SkylakeX")
    monkeypatch.setattr(cpu_search, "_memo", {})
    monkeypatch.setattr(cpu_search.faiss, "knn", real_knn)
    assert cpu_search.auto_cpu_search()["source"] == "measured"


def test_a_cached_choice_is_measured_again_when_numpys_blas_or_the_format_changes(fresh_cache, monkeypatch):
    key = cpu_search.machine_key()
    record = {**cpu_search.measure(), "key": key}
    path = cpu_search._cache_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    assert cpu_search.cached_choice(key)["choice"] == record["choice"]
    # A record of the two-way format (no numpy in the key) under this key's file is not reused.
    old_key = {k: v for k, v in key.items() if k not in ("format", "numpy", "numpy_blas")}
    path.write_text(json.dumps({"faiss_knn_gflops": 1.0, "torch_knn_gflops": 2.0, "choice": "torch", "key": old_key}))
    assert cpu_search.cached_choice(key) is None
    # Another numpy BLAS (library, version or kernel) is another machine as far as the choice goes.
    path.write_text(json.dumps(record))
    monkeypatch.setattr(cpu_search, "numpy_blas", lambda: {**key["numpy_blas"], "architecture": "Prescott"})
    assert cpu_search.machine_key() != key and cpu_search.cached_choice() is None


@pytest.mark.parametrize(("architecture", "folder"), [("SkylakeX", "faiss_cpu.libs"), ("Prescott", "numpy.libs")])
def test_a_fitting_kernel_or_another_librarys_is_measured(fresh_cache, monkeypatch, architecture, folder):
    _fake_blas(monkeypatch, architecture, folder)
    assert cpu_search.generic_faiss_blas() is None
    assert cpu_search.auto_cpu_search()["source"] == "measured"


def test_compute_threads_bound_every_blas_as_well_as_torch():
    """A replica's or a build's thread count must hold for numpy's BLAS too: the exact search may run on it."""
    import threadpoolctl
    import torch

    from ocbank.engine.threads import set_compute_threads

    blas_before = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}
    before = torch.get_num_threads()
    try:
        assert set_compute_threads(1) == before
        infos = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        assert infos and all(i["num_threads"] == 1 for i in infos)
        assert torch.get_num_threads() == 1
    finally:
        set_compute_threads(before)
        threadpoolctl.threadpool_limits(limits=max(blas_before.values(), default=before), user_api="blas")
