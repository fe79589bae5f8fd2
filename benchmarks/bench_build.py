"""Build throughput of ClusterBank against the machine's GEMM rate.

Streams a clustered synthetic set (generated batch by batch, never held whole)
in batches of 784 vectors (one 224^2 image) and reports, in one JSON file:

- vectors/s and effective GFLOP/s (2 * dim * K_t per vector, K_t = bank size
  when the vector arrives) for the batched build;
- the fp32 matrix-multiply GFLOP/s of this machine, measured in the same run,
  and the ratio of the two (bar: >= 0.5);
- a naive per-vector loop (one FAISS query per vector) on a prefix, side by
  side with the batched build on the same prefix;
- peak RSS of separate processes streaming N and 4N vectors (must agree
  within 10%: memory is O(K * dim + batch), not O(N * dim)).

Real-feature mode (--real): WideResNet-50 features (weights none) of the
synthetic texture classes, cached as .npy, streamed image by image into a bank
whose radius is the estimated p99 rule, side by side with the synthetic stream
of the same length; vectors/s, new centroids per image, K growth, the GEMM
ratio and a line-timing profile of the chunk (FAISS distances, numba kernel,
norms, rest) -> build_real_<size>_cpu.json + .png.

Usage: python -m benchmarks.bench_build --out bench_out [--n 100000] [--device cpu]
       python -m benchmarks.bench_build --out benchmarks/results --real [--real-size 224]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

DIM = 1536
BATCH = 784


# ---------------------------------------------------------------------- real features
def _grain(rng: np.random.Generator, size: int) -> np.ndarray:
    """A third texture family for the benchmarks: oriented wood-like grain with knots."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    warp = 3.0 * np.sin(2 * np.pi * v / rng.uniform(60, 80) + rng.uniform(0, 2 * np.pi))
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * (u + warp) / rng.uniform(7, 9))
    color = np.array([0.6, 0.42, 0.25]) + rng.normal(0, 0.02, 3)
    img = (0.6 + 0.4 * rings[..., None]) * color[None, None]
    return img + rng.normal(0, 0.03, img.shape)


BENCH_CLASSES = ("weave", "dots", "grain")


def make_bench_data(root: str | Path, classes: tuple[str, ...], size: int, n_train: int, n_test: int) -> Path:
    """MVTec-layout textures (ocbank.synthetic plus the benchmark-only ``grain``) at ``size``^2, cached on disk."""
    from ocbank import synthetic

    synthetic.TEXTURES.setdefault("grain", _grain)  # benchmark-only family; synthetic.py is not changed
    root = Path(root)
    missing = tuple(c for c in classes if not (root / c / "train" / "good").is_dir())
    if missing:
        synthetic.make_dataset(root, classes=missing, n_train=n_train, n_good_test=n_test, n_defect_test=n_test,
                               size=size)
    return root


def detector_config(size: int, batch_size: int = 16) -> dict:
    """The Detector config of the two settings: 224 (resize 256, crop 224) or 512 (resize 512, no crop)."""
    data = {"resize": 256, "crop": 224} if size == 224 else {"resize": size, "crop": None}
    return {"data": {**data, "batch_size": batch_size, "num_workers": 0}, "backbone": {"weights": "none"},
            "device": "cpu", "bank": {"radius": "auto"}}


def real_features(root: Path, name: str, size: int, n_images: int, cache: Path, split: str = "train") -> np.ndarray:
    """Patch features [n_images * h * w, 1536] of a class's first ``split`` images, cached as .npy (memory-mapped)."""
    from ocbank.data.datasets import mvtec_split
    from ocbank.model.detector import Detector

    tag = "" if split == "train" else f"_{split}"
    path = Path(cache) / f"{name}_{size}_{n_images}{tag}.npy"
    if not path.is_file():
        samples = getattr(mvtec_split(Path(root), name), split)[:n_images]
        det = Detector.from_config(detector_config(size))
        grid = size // 8
        out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32,
                                        shape=(len(samples) * grid * grid, DIM))
        row = 0
        for _, feats in det.features(samples):
            f = feats.reshape(-1, DIM).numpy()
            out[row : row + len(f)] = f
            row += len(f)
        out.flush()
        del out
        path.with_suffix(".tmp.npy").rename(path)
    return np.load(path, mmap_mode="r")


class ClusteredStream:
    """Deterministic clustered vectors: batch i depends only on (seed, i)."""

    def __init__(self, n_clusters: int, dim: int = DIM, spread: float = 2.0, noise: float = 0.45, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centers = (rng.standard_normal((n_clusters, dim)) * spread).astype(np.float32)
        # Zipf-like popularity, as in real images: a few textures dominate.
        pop = 1.0 / np.arange(1, n_clusters + 1) ** 0.5
        self.p = pop / pop.sum()
        self.noise = noise
        self.seed = seed

    def batch(self, i: int, size: int = BATCH) -> np.ndarray:
        rng = np.random.default_rng((self.seed, i))
        idx = rng.choice(len(self.p), size=size, p=self.p)
        x = self.centers[idx] + rng.standard_normal((size, self.centers.shape[1]), dtype=np.float32) * self.noise
        return x.astype(np.float32, copy=False)


def write_result(out_dir: str | Path, filename: str, result: dict) -> Path:
    """Write a benchmark's JSON result under out_dir and print it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    return path


def gemm_gflops(k: int, dim: int = DIM, batch: int = BATCH, repeats: int = 5) -> float:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((batch, dim), dtype=np.float32)
    b = rng.standard_normal((k, dim), dtype=np.float32)
    a @ b.T
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b.T
    dt = (time.perf_counter() - t) / repeats
    return 2.0 * batch * k * dim / dt / 1e9


def naive_build(stream: ClusteredStream, n: int, radius: float) -> tuple[float, float, int]:
    """One faiss.knn query per vector, plain Python loop. Returns (seconds, flops, K)."""
    import faiss

    means = np.zeros((n, DIM), dtype=np.float32)
    counts = np.zeros(n, dtype=np.int64)
    k = 0
    flops = 0.0
    r2 = radius * radius
    t = time.perf_counter()
    for bi in range(-(-n // BATCH)):
        for x in stream.batch(bi)[: n - bi * BATCH]:
            if k:
                flops += 2.0 * DIM * k
                d, i = faiss.knn(x[None], means[:k], 1)
                j = int(i[0, 0])
                if d[0, 0] <= r2:
                    counts[j] += 1
                    means[j] += (x - means[j]) / counts[j]
                    continue
            means[k] = x
            counts[k] = 1
            k += 1
    return time.perf_counter() - t, flops, k


def batched_build(stream: ClusteredStream, n: int, radius: float, device: str, trace: bool = False) -> dict:
    from ocbank import ClusterBank

    bank = ClusterBank(DIM, radius, device=device)
    bank.add(stream.batch(10**9, 8))  # compile the kernel outside the timing
    bank = ClusterBank(DIM, radius, device=device)
    flops = 0.0
    seconds = 0.0
    k_trace = []
    n_batches = -(-n // BATCH)
    for bi in range(n_batches):
        x = stream.batch(bi)[: n - bi * BATCH]
        k_before = len(bank)
        t = time.perf_counter()
        bank.add(x)
        seconds += time.perf_counter() - t
        # K_t grows inside the batch; count from the size before it (a lower bound).
        flops += 2.0 * DIM * k_before * len(x)
        if trace:
            k_trace.append((bank.n_seen, len(bank)))
    return {"seconds": seconds, "flops": flops, "k": len(bank), "trace": k_trace}


def _rss_worker(n: int, n_clusters: int, radius: float, queue: mp.Queue) -> None:
    stream = ClusteredStream(n_clusters)
    result = batched_build(stream, n, radius, "cpu")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"n": n, "k": result["k"], "peak_rss_bytes": peak_kib * 1024})


def peak_rss(n: int, n_clusters: int, radius: float) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_rss_worker, args=(n, n_clusters, radius, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def plot(trace: list[tuple[int, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen, k = zip(*trace, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(seen, k)
    ax.set_xlabel("vectors streamed")
    ax.set_ylabel("centroids K")
    ax.set_title("ClusterBank size levels off while the stream grows")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ChunkProfiler:
    """Line timing of CpuStore.add: wraps its FAISS distance call, the numba kernel and the norm updates.

    Installed by patching names in ``ocbank.engine.store`` for the duration of a
    ``with`` block (the engine's files are not changed). The rest of each chunk
    (the Gram matrix ``chunk @ chunk.T``, np.unique, buffer growth) is reported as
    ``other`` = total - the timed parts.
    """

    def __init__(self) -> None:
        self.seconds = {"pairwise_distances": 0.0, "resolve_chunk": 0.0, "sq_norms": 0.0}
        self.calls = dict.fromkeys(self.seconds, 0)
        self.chunk_sizes: list[int] = []

    def _wrap(self, key: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t
                self.calls[key] += 1
        return timed

    def __enter__(self) -> ChunkProfiler:
        from ocbank.engine import store

        self._store = store
        self._saved = (store.faiss, store.resolve_chunk, store._sq_norms)
        real_faiss = store.faiss
        profiler = self

        class _Faiss:
            def __getattr__(self, name):
                return getattr(real_faiss, name)

            def pairwise_distances(self, a, b):
                profiler.chunk_sizes.append(len(a))
                return profiler._wrap("pairwise_distances", real_faiss.pairwise_distances)(a, b)

        store.faiss = _Faiss()
        store.resolve_chunk = self._wrap("resolve_chunk", self._saved[1])
        store._sq_norms = self._wrap("sq_norms", self._saved[2])
        return self

    def __exit__(self, *exc) -> None:
        self._store.faiss, self._store.resolve_chunk, self._store._sq_norms = self._saved


def stream_build(batches, radius: float, profile: bool = False) -> dict:
    """Stream batches [784, DIM] into a CPU ClusterBank; per-batch K, new centroids and effective FLOPs."""
    from ocbank import ClusterBank

    warm = ClusterBank(DIM, radius)
    warm.add(np.random.default_rng(0).standard_normal((8, DIM), dtype=np.float32))  # compile outside the timing
    bank = ClusterBank(DIM, radius)
    flops = seconds = 0.0
    k_trace, new_per_batch = [], []
    profiler = ChunkProfiler() if profile else None
    if profiler is not None:
        profiler.__enter__()
    try:
        for x in batches:
            k_before = len(bank)
            t = time.perf_counter()
            bank.add(x)
            seconds += time.perf_counter() - t
            flops += 2.0 * DIM * k_before * len(x)
            new_per_batch.append(len(bank) - k_before)
            k_trace.append((bank.n_seen, len(bank)))
    finally:
        if profiler is not None:
            profiler.__exit__()
    out = {"seconds": seconds, "flops": flops, "k": len(bank), "n": bank.n_seen, "trace": k_trace,
           "new_per_batch": new_per_batch}
    if profiler is not None:
        parts = dict(profiler.seconds)
        parts["other (gram, unique, growth)"] = seconds - sum(parts.values())
        out["profile_seconds"] = parts
        out["profile_calls"] = profiler.calls
        out["mean_chunk_rows"] = float(np.mean(profiler.chunk_sizes)) if profiler.chunk_sizes else 0.0
    return out


def line_timed_build(batches, radius: float) -> dict:
    """CpuStore.add's chunk loop, copied statement by statement with a timer on each (line timing).

    Runs on a CpuStore's own buffers and is checked against ClusterBank.add on the
    same stream (same K and counts, means to float rounding), so the split is
    faithful to the engine's code at the time of the run.
    """
    from ocbank import ClusterBank
    from ocbank.engine import store as store_mod
    from ocbank.engine.kernel import Book, Chunk, Search, resolve_chunk
    from ocbank.engine.store import NO_LIMIT

    st = store_mod.CpuStore(DIM, radius)
    lines = {"check_rows (ascontiguous + isfinite)": 0.0, "reserve (buffer growth)": 0.0,
             "faiss.pairwise_distances b x K": 0.0, "gram chunk @ chunk.T (b x b)": 0.0,
             "sq_norms(chunk)": 0.0, "resolve_chunk (numba)": 0.0, "unique + norms of touched": 0.0}
    flops = {"distances": 0.0, "gram": 0.0}
    ref = ClusterBank(DIM, radius)
    clock = time.perf_counter
    for x in batches:
        ref.add(x)
        t = clock()
        X = np.ascontiguousarray(x, dtype=np.float32)
        np.isfinite(X).all(axis=1)
        lines["check_rows (ascontiguous + isfinite)"] += clock() - t
        weights = np.ones(len(X), dtype=np.int64)
        pm2 = np.zeros(len(X), dtype=np.float64)
        start, n = 0, X.shape[0]
        while start < n:
            k0 = st.size
            stop = min(n, start + store_mod.chunk_rows(k0))
            chunk, w = X[start:stop], weights[start:stop]
            b = chunk.shape[0]
            t = clock()
            st.reserve(k0 + b)
            t1 = clock()
            dist = store_mod.faiss.pairwise_distances(chunk, st._means[:k0]) if k0 else np.zeros((b, 0), np.float32)
            t2 = clock()
            gram = chunk @ chunk.T
            t3 = clock()
            xn = store_mod._sq_norms(chunk)
            t4 = clock()
            assign = np.empty(b, dtype=np.int64)
            ch = Chunk(chunk, w, pm2[start:stop], xn, gram)
            se = Search(dist, np.arange(k0, dtype=np.int64), st._norms[:k0], np.zeros((b, 0), np.int64), True, True)
            done, k_new, _ = resolve_chunk(ch, se, Book(st._means, st._counts, st._m2), k0, st.r2, NO_LIMIT, assign)
            t5 = clock()
            st._apply(chunk[:done], w[:done], assign[:done], k_new)
            st.size = k_new
            t6 = clock()
            for key, dt in zip(list(lines)[1:], (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True):
                lines[key] += dt
            flops["distances"] += 2.0 * DIM * b * k0
            flops["gram"] += 2.0 * DIM * b * b
            start += done
    same = st.size == len(ref) and np.array_equal(st.counts, ref.counts)
    total = sum(lines.values())
    return {"seconds": lines, "total_seconds": total, "share": {k: v / total for k, v in lines.items()},
            "gflop": {k: v / 1e9 for k, v in flops.items()},
            "gflops_in_distances": flops["distances"] / lines["faiss.pairwise_distances b x K"] / 1e9,
            "gflops_in_gram": flops["gram"] / max(lines["gram chunk @ chunk.T (b x b)"], 1e-12) / 1e9,
            "matches_clusterbank": bool(same), "k": st.size}


def summarize_stream(run: dict, gemm: float) -> dict:
    eff = run["flops"] / run["seconds"] / 1e9
    new = np.asarray(run["new_per_batch"])
    return {
        "n_vectors": run["n"],
        "final_centroids": run["k"],
        "k_over_n": run["k"] / run["n"],
        "build_seconds": run["seconds"],
        "vectors_per_s": run["n"] / run["seconds"],
        "effective_gflops": eff,
        "gemm_gflops_at_final_k": gemm,
        "ratio_effective_to_gemm": eff / gemm,
        "new_centroids_per_784_batch": {"first": int(new[0]), "median": float(np.median(new)),
                                        "last_10_mean": float(new[-10:].mean()), "all": new.tolist()},
        "k_trace": run["trace"],
        **({"profile_seconds": run["profile_seconds"], "profile_calls": run["profile_calls"],
            "mean_chunk_rows": run["mean_chunk_rows"]} if "profile_seconds" in run else {}),
    }


def real_mode(args) -> dict:
    """Real WRN50 features of each class side by side with the synthetic clustered stream (same N), one run."""
    from ocbank.model.radius import estimate_radius

    data = Path(args.data)
    size = args.real_size
    classes = tuple(args.real_classes.split(","))
    root = make_bench_data(data / f"d{size}", classes, 256 if size == 224 else size, 60, 10)
    result = {
        "machine": {"platform": platform.platform(), "cpus": mp.cpu_count(), "load_avg_at_start": os.getloadavg(),
                    "note": "2-core CPU box shared with other engineers (contended); ratios are within this run"},
        "image_size": size, "images_per_class": args.real_images, "runs": {},
    }
    n_vectors = None
    for name in classes:
        x = np.ascontiguousarray(real_features(root, name, size, args.real_images, data / "cache"))
        est = estimate_radius(x)
        per_image = (size // 8) ** 2
        run = stream_build((x[i : i + per_image] for i in range(0, len(x), per_image)), est.radius, profile=True)
        result["runs"][f"real_{name}"] = {"radius": est.radius, **summarize_stream(run, gemm_gflops(run["k"]))}
        if args.line_timing:
            lt = line_timed_build((x[i : i + per_image] for i in range(0, len(x), per_image)), est.radius)
            result["runs"][f"real_{name}"]["line_timing"] = lt
            print(name, "line timing", lt, flush=True)
        n_vectors = len(x)
        print(name, {k: v for k, v in result["runs"][f"real_{name}"].items()
                     if k not in ("k_trace", "new_centroids_per_784_batch")}, flush=True)
    stream = ClusteredStream(args.clusters)
    n_batches = -(-n_vectors // BATCH)
    run = stream_build((stream.batch(i) for i in range(n_batches)), args.radius, profile=True)
    result["runs"]["synthetic_clustered"] = {"radius": args.radius, **summarize_stream(run, gemm_gflops(run["k"]))}
    tag = "_line_timing" if args.line_timing else ""
    write_result(args.out, f"build_real_{size}_cpu{tag}.json", result)
    plot_real(result, Path(args.out) / f"build_real_{size}_cpu{tag}.png")
    return result


def plot_real(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, run in result["runs"].items():
        seen, k = zip(*run["k_trace"], strict=True)
        ax1.plot(seen, k, label=f"{name} (K={run['final_centroids']})")
        ax2.bar(name.replace("_", "\n"), run["ratio_effective_to_gemm"])
    ax1.set_xlabel("vectors streamed")
    ax1.set_ylabel("centroids K")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.axhline(0.5, color="k", ls="--", lw=1)
    ax2.set_ylabel("effective GFLOP/s / GEMM GFLOP/s")
    ax2.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"ClusterBank build on WRN50 (weights none) features at {result['image_size']}^2 vs synthetic")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", help="output directory")
    ap.add_argument("--n", type=int, default=100_352, help="vectors in the main stream (>= 100k)")
    ap.add_argument("--clusters", type=int, default=8000)
    ap.add_argument("--radius", type=float, default=26.0)
    ap.add_argument("--naive-prefix", type=int, default=4704)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-rss", action="store_true", help="skip the N vs 4N peak-RSS runs")
    ap.add_argument("--real", action="store_true", help="real-feature mode: WRN50 features of synthetic textures")
    ap.add_argument("--real-classes", default=",".join(BENCH_CLASSES))
    ap.add_argument("--real-size", type=int, default=224, choices=[224, 512])
    ap.add_argument("--real-images", type=int, default=50, help="training images per class streamed")
    ap.add_argument("--data", default="/tmp/ocb_bench", help="scratch folder for images and cached .npy features")
    ap.add_argument("--line-timing", action="store_true", help="real mode: also line-time the chunk loop per class")
    args = ap.parse_args(argv)
    if args.real:
        return real_mode(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    stream = ClusteredStream(args.clusters)
    main_run = batched_build(stream, args.n, args.radius, args.device, trace=True)
    k_final = main_run["k"]
    gemm = gemm_gflops(k_final)
    eff = main_run["flops"] / main_run["seconds"] / 1e9

    naive_s, naive_flops, naive_k = naive_build(stream, args.naive_prefix, args.radius)
    prefix = batched_build(stream, args.naive_prefix, args.radius, args.device)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": mp.cpu_count()},
        "device": args.device,
        "dim": DIM,
        "batch": BATCH,
        "radius": args.radius,
        "n_vectors": args.n,
        "final_centroids": k_final,
        "build_seconds": main_run["seconds"],
        "vectors_per_s": args.n / main_run["seconds"],
        "effective_gflops": eff,
        "gemm_gflops": gemm,
        "ratio_effective_to_gemm": eff / gemm,
        "naive_prefix": {
            "n_vectors": args.naive_prefix,
            "k": naive_k,
            "naive_vectors_per_s": args.naive_prefix / naive_s,
            "naive_effective_gflops": naive_flops / naive_s / 1e9,
            "batched_vectors_per_s": args.naive_prefix / prefix["seconds"],
            "batched_k": prefix["k"],
            "speedup": naive_s / prefix["seconds"],
        },
    }
    if not args.skip_rss:
        small = peak_rss(args.n, args.clusters, args.radius)
        large = peak_rss(4 * args.n, args.clusters, args.radius)
        result["peak_rss"] = {
            "n": small,
            "4n": large,
            "ratio_4n_to_n": large["peak_rss_bytes"] / small["peak_rss_bytes"],
        }
    write_result(out, "build.json", result)
    plot(main_run["trace"], out / "build_k_growth.png")
    return result


if __name__ == "__main__":
    main()
