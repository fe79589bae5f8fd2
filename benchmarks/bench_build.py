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
ratio -> build_real_<size>_cpu.json + .png; with --profile, a cProfile of the real
ClusterBank.add per class (a separate pass) -> build_real_<size>_cpu_profile.json.

Usage: python -m benchmarks.bench_build --out bench_out [--n 100000] [--device cpu]
       python -m benchmarks.bench_build --out benchmarks/results --real [--real-size 224] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import pstats
import resource
import time
from pathlib import Path

import numpy as np

from .common import (
    BATCH,
    BENCH_CLASSES,
    DIM,
    ClusteredStream,
    gemm_gflops,
    machine_info,
    make_bench_data,
    real_features,
    stream_build,
    write_result,
)


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


def profile_add(batches, radius: float, top: int = 12) -> dict:
    """cProfile of the real ``ClusterBank.add`` over a stream: the functions with the most own time.

    A separate pass from :func:`stream_build`, so the profiler's overhead never enters the timed
    figures. Time spent in numpy operators (``chunk @ chunk.T``) is counted in their caller.
    """
    from ocbank import ClusterBank

    ClusterBank(DIM, radius).add(np.random.default_rng(0).standard_normal((8, DIM), dtype=np.float32))
    bank = ClusterBank(DIM, radius)
    profiler = cProfile.Profile()
    for x in batches:
        profiler.enable()
        bank.add(x)
        profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {
        "total_seconds": total,
        "k": len(bank),
        "functions": [
            {"function": pstats.func_std_string(func), "calls": nc, "own_seconds": tt, "cumulative_seconds": ct,
             "own_share": tt / total if total else 0.0}
            for func, (_, nc, tt, ct, _) in rows
        ],
    }


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
    }


def real_mode(args) -> dict:
    """Real WRN50 features of each class side by side with the synthetic clustered stream (same N), one run."""
    from ocbank.model.radius import estimate_radius

    data = Path(args.data)
    size = args.real_size
    classes = tuple(args.real_classes.split(","))
    root = make_bench_data(data / f"d{size}", classes, 256 if size == 224 else size, 60, 10)
    result = {
        "machine": machine_info(note="ratios are within this run"),
        "image_size": size, "images_per_class": args.real_images, "runs": {},
    }
    n_vectors = None
    for name in classes:
        x = np.ascontiguousarray(real_features(root, name, size, args.real_images, data / "cache"))
        est = estimate_radius(x)
        per_image = (size // 8) ** 2
        run = stream_build((x[i : i + per_image] for i in range(0, len(x), per_image)), est.radius)
        result["runs"][f"real_{name}"] = {"radius": est.radius, **summarize_stream(run, gemm_gflops(run["k"]))}
        if args.profile:
            prof = profile_add((x[i : i + per_image] for i in range(0, len(x), per_image)), est.radius)
            result["runs"][f"real_{name}"]["profile"] = prof
        n_vectors = len(x)
        print(name, {k: v for k, v in result["runs"][f"real_{name}"].items()
                     if k not in ("k_trace", "new_centroids_per_784_batch")}, flush=True)
    stream = ClusteredStream(args.clusters)
    n_batches = -(-n_vectors // BATCH)
    run = stream_build((stream.batch(i) for i in range(n_batches)), args.radius)
    result["runs"]["synthetic_clustered"] = {"radius": args.radius, **summarize_stream(run, gemm_gflops(run["k"]))}
    tag = "_profile" if args.profile else ""
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
    ap.add_argument("--profile", action="store_true",
                    help="real mode: also cProfile ClusterBank.add per class (a separate, untimed pass)")
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
        "machine": machine_info(args.device),
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
