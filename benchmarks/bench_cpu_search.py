"""The CPU bank's exact search on faiss's bundled BLAS, torch's GEMM and numpy's, side by side in one process.

Everything is interleaved (faiss, torch, numpy, faiss, ...) on the same inputs, so a burst
of load on a shared machine hits every side alike and the ratios hold where absolute rates
do not:

- ``gemm``: numpy's and torch's fp32 GEMM rate, [784, 1536] @ [1536, K];
- ``knn``: exact k=1 search of 784 queries (one 224^2 image) against K centroids through a
  CPU store with each ``cpu_search``;
- ``add``: streaming add at a steady bank size. Three banks (``cpu_search: faiss``, ``torch``,
  ``numpy``) start from the same K centroids (the centres of a clustered stream) and take
  the same batches of 784 vectors in turn, after numpy's GEMM of the same batch against the K
  centroids; vectors/s, effective GFLOP/s (2 * dim * K per vector) and their share of that GEMM's
  rate (timed in the same turns, so load hits both alike), and a check that the banks stay identical;
- ``scoring``: the demo config (weights none, 224^2) fitted on one demo class, then
  ``predict`` on its test images in alternating rounds with each search: img/s of each search's
  best round (a burst of load lowers a round, not the figure), the 1-NN search alone per image on
  the same features, and the scores' largest difference;
- ``auto``: what ``cpu_search: auto`` decides here (the rule, then a measurement, into an empty
  cache), beside a fresh measurement of all three.

Run it with the BLAS environment unset, so that each BLAS picks its own kernel as on a user's
machine (a set ``OPENBLAS_CORETYPE`` hides the faiss wheel's generic kernel); the result
records both variables as it saw them:

env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.bench_cpu_search --out benchmarks/results  # -> cpu_search_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ocbank.engine.knn import CPU_SEARCH_BACKENDS

from .common import BATCH, DIM, ClusteredStream, gemm_gflops, machine_info, write_result

SEARCHES = CPU_SEARCH_BACKENDS  # faiss, torch, numpy
# The variables that move a BLAS off the kernel it would pick for this CPU.
OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def ratios(values: dict[str, float]) -> dict[str, float]:
    """numpy's and torch's figure over faiss's, and numpy's over torch's."""
    return {"torch_over_faiss": values["torch"] / values["faiss"], "numpy_over_faiss": values["numpy"] / values["faiss"],
            "numpy_over_torch": values["numpy"] / values["torch"]}


def gemm_rates(k: int, rounds: int = 3) -> dict[str, float]:
    """numpy's and torch's GFLOP/s on [BATCH, DIM] @ [DIM, k], interleaved, best of ``rounds``."""
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.standard_normal((BATCH, DIM), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal((k, DIM), dtype=np.float32))
    best_torch = float("inf")
    numpy_rate = 0.0
    for _ in range(rounds):
        numpy_rate = max(numpy_rate, gemm_gflops(k, repeats=2))
        start = time.perf_counter()
        a @ b.T
        a @ b.T
        best_torch = min(best_torch, (time.perf_counter() - start) / 2)
    return {"numpy": numpy_rate, "torch": 2.0 * BATCH * k * DIM / best_torch / 1e9}


def knn_rates(means: np.ndarray, queries: np.ndarray, rounds: int = 5) -> dict[str, float]:
    """GFLOP/s of exact k=1 search through a CPU bank's store with each search, interleaved."""
    from ocbank.engine.store import CpuStore

    stores = {}
    for name in SEARCHES:
        store = CpuStore(DIM, 1.0, search=name)
        store.set_state(means, np.ones(len(means), np.int64), np.zeros(len(means)))
        stores[name] = store
    best = dict.fromkeys(SEARCHES, float("inf"))
    for round_ in range(rounds + 1):
        for name, store in stores.items():
            start = time.perf_counter()
            store.search(queries, 1)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    flops = 2.0 * len(queries) * len(means) * DIM
    return {name: flops / seconds / 1e9 for name, seconds in best.items()}


def streaming_add(stream: ClusteredStream, radius: float, n_batches: int) -> dict[str, Any]:
    """Every search streams the same batches into a bank that starts from the stream's centres, in turn.

    Each turn also times numpy's GEMM of the batch against the centres: the rate the adds' shares are of.
    """
    from ocbank import ClusterBank
    from ocbank.engine.checkpoint import BankState

    centres = np.ascontiguousarray(stream.centers)
    k0 = len(centres)
    state = BankState(means=centres, counts=np.ones(k0, np.int64), radius=radius, dim=DIM, n_seen=k0, m2=np.zeros(k0))
    banks = {name: ClusterBank.from_state(state, cpu_search=name, search_index="flat") for name in SEARCHES}
    for bank in banks.values():  # compile the kernel outside the timing
        bank.add(stream.batch(10**9, 8))
    seconds = dict.fromkeys(SEARCHES, 0.0)
    flops = dict.fromkeys(SEARCHES, 0.0)
    gemm_seconds = 0.0
    for i in range(n_batches):
        x = stream.batch(i)
        start = time.perf_counter()
        x @ centres.T
        gemm_seconds += time.perf_counter() - start
        for name, bank in banks.items():
            k_before = len(bank)
            start = time.perf_counter()
            bank.add(x)
            seconds[name] += time.perf_counter() - start
            flops[name] += 2.0 * DIM * k_before * len(x)
    ref = banks["faiss"]
    same = all(np.array_equal(ref.counts, bank.counts) for bank in banks.values())
    return {
        "n_vectors": n_batches * BATCH,
        "k_start": k0,
        "k_end": {name: len(bank) for name, bank in banks.items()},
        "identical_counts": same,
        "max_abs_mean_difference": max(float(np.abs(ref.means - b.means).max()) for b in banks.values()) if same else None,
        "vectors_per_s": {name: n_batches * BATCH / seconds[name] for name in SEARCHES},
        "effective_gflops": {name: flops[name] / seconds[name] / 1e9 for name in SEARCHES},
        "numpy_gemm_gflops": 2.0 * DIM * k0 * n_batches * BATCH / gemm_seconds / 1e9,
    }


def scoring(data: Path, n_train: int, n_test: int, rounds: int) -> dict[str, Any]:
    """img/s of Detector.predict at 224^2 (demo config, weights none) with each search: the best of alternating rounds."""
    from ocbank import Detector, config
    from ocbank.synthetic import make_dataset

    name = "dots"
    root = data / f"demo_data_{n_train}"
    if not (root / name / "train" / "good").is_dir():
        make_dataset(root, classes=(name,), n_train=n_train)
    train = sorted((root / name / "train" / "good").glob("*.png"))[:n_train]
    test = sorted((root / name / "test").rglob("*.png"))[:n_test]
    dets: dict[str, Detector] = {}
    for search in SEARCHES:
        cfg = config.load("demo", overrides={"data": {"root": str(root), "classes": [name]},
                                              "bank": {"cpu_search": search}})
        det = Detector.from_config(cfg, extractor=None if not dets else dets["faiss"].extractor)
        if not dets:
            det.fit(train)
        else:
            first = dets["faiss"]
            det.restore(first.bank.state(), dataclasses.replace(first.record(), config=det.config))
        dets[search] = det
    assert {s: d.bank.search_backend["search"] for s, d in dets.items()} == {s: s for s in SEARCHES}
    feats = torch.cat([f for _, f in dets["faiss"].features(test)]).reshape(-1, DIM).numpy()
    per_image = feats.shape[0] // len(test)
    predict_best = dict.fromkeys(SEARCHES, float("inf"))
    search_best = dict.fromkeys(SEARCHES, float("inf"))
    scores = {}
    for _ in range(rounds):
        for search, det in dets.items():
            start = time.perf_counter()
            scores[search] = det.predict([str(p) for p in test]).scores
            predict_best[search] = min(predict_best[search], time.perf_counter() - start)
            start = time.perf_counter()
            det.bank.search(feats, 1)
            search_best[search] = min(search_best[search], time.perf_counter() - start)
    k = len(dets["faiss"].bank)
    return {
        "class": name,
        "image_size": 224,
        "train_images": len(train),
        "test_images": len(test),
        "bank_centroids": k,
        "patches_per_image": per_image,
        "predict_rounds": rounds,
        "images_per_s": {s: len(test) / predict_best[s] for s in SEARCHES},
        "search_ms_per_image": {s: 1000 * search_best[s] / len(test) for s in SEARCHES},
        "search_gflops": {s: 2.0 * feats.shape[0] * k * DIM / search_best[s] / 1e9 for s in SEARCHES},
        "max_abs_score_difference": max(float(np.abs(scores["faiss"] - scores[s]).max()) for s in SEARCHES),
        "score_range": float(scores["faiss"].max() - scores["faiss"].min()),
    }


def fresh_auto() -> dict[str, Any]:
    """What ``cpu_search: auto`` decides here now (the rule, then a measurement), not a choice cached earlier."""
    from ocbank.engine import cpu_search

    saved = os.environ.get(cpu_search.CACHE_ENV)
    with tempfile.TemporaryDirectory() as fresh:
        os.environ[cpu_search.CACHE_ENV] = fresh
        try:
            return {k: v for k, v in cpu_search.auto_cpu_search().items() if k != "key"}
        finally:
            if saved is None:
                os.environ.pop(cpu_search.CACHE_ENV)
            else:
                os.environ[cpu_search.CACHE_ENV] = saved


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="output directory")
    ap.add_argument("--clusters", type=int, default=8000, help="bank size K the streaming add starts from")
    ap.add_argument("--radius", type=float, default=26.0)
    ap.add_argument("--batches", type=int, default=12, help="batches of 784 vectors each bank streams")
    ap.add_argument("--train-images", type=int, default=40, help="demo images the scoring bank is fitted on")
    ap.add_argument("--test-images", type=int, default=8, help="demo test images scored per round")
    ap.add_argument("--rounds", type=int, default=4, help="alternating predict rounds per search (the best one counts)")
    ap.add_argument("--data", default="/tmp/ocb_bench", help="scratch folder for the demo images")
    ap.add_argument("--skip-scoring", action="store_true")
    args = ap.parse_args(argv)
    from ocbank import doctor
    from ocbank.engine import cpu_search

    openblas_env = {name: os.environ.get(name) for name in OPENBLAS_ENV}
    stream = ClusteredStream(args.clusters)
    gemm = gemm_rates(args.clusters)
    knn = knn_rates(np.ascontiguousarray(stream.centers), stream.batch(10**6))
    add = streaming_add(stream, args.radius, args.batches)
    add["share_of_numpy_gemm"] = {s: add["effective_gflops"][s] / add["numpy_gemm_gflops"] for s in SEARCHES}
    add.update(ratios(add["vectors_per_s"]))
    unset = not any(openblas_env.values())
    note = ("OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset: each BLAS picked its own kernel" if unset else
            f"run with {openblas_env}: the BLAS kernels may not be the ones this CPU gets by default")
    result: dict[str, Any] = {
        "machine": {**machine_info("cpu", note=note), "openblas_env": openblas_env, "openblas_env_unset": unset},
        # By owner: machine["blas"] lists the libraries in load order, which moves with the imports.
        "blas_of": {"numpy": cpu_search.numpy_blas(), "faiss": cpu_search.bundled_blas("faiss"),
                    "torch": "MKL" if torch.backends.mkl.is_available() else "not MKL (see torch.__config__.show())"},
        "gemm_gflops_at_k": {"k": args.clusters, **gemm},
        "knn_gflops": {"queries": BATCH, "k": args.clusters, **knn, **ratios(knn)},
        "streaming_add": add,
        "auto": {**fresh_auto(), "measured_now": cpu_search.measure()},
        "warnings": doctor.collect(measure=False)["warnings"],
    }
    if not args.skip_scoring:
        score = scoring(Path(args.data), args.train_images, args.test_images, args.rounds)
        score.update({f"{name}_images_per_s": value for name, value in ratios(score["images_per_s"]).items()})
        result["scoring"] = score
    write_result(args.out, "cpu_search_cpu.json", result)
    return result


if __name__ == "__main__":
    main()
