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

Usage: python -m benchmarks.bench_build --out bench_out [--n 100000] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import numpy as np

DIM = 1536
BATCH = 784


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

    seen, k = zip(*trace)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(seen, k)
    ax.set_xlabel("vectors streamed")
    ax.set_ylabel("centroids K")
    ax.set_title("ClusterBank size levels off while the stream grows")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    args = ap.parse_args(argv)
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
