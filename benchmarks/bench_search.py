"""Search-only FPS at Real-IAD scale: ocbank's bank against PatchCore's full bank.

A synthetic stand-in for one Real-IAD class: ``--images`` training images x 784
patches (default 1,200 x 784 = 940,800 vectors, 5.8 GB as a full bank), streamed
into a ClusterBank; both banks then answer 1-NN queries for batches of 32 test
images with the same FAISS call. Meant for a GPU; on CPU use small --images.

python -m benchmarks.bench_search --out DIR [--device cuda] [--images 1200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ocbank import ClusterBank
from ocbank.engine.bank import resolve_device

from .bench_build import BATCH, DIM, ClusteredStream, write_result
from .run import FlatSearch, gemm_rate


def search_fps(search: FlatSearch, queries: np.ndarray, images: int, repeats: int = 5) -> float:
    search(queries)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        search(queries)
        times.append(time.perf_counter() - t)
    return images / float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--clusters", type=int, default=20000)
    ap.add_argument("--radius", type=float, default=26.0)
    ap.add_argument("--query-images", type=int, default=32)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    stream = ClusteredStream(args.clusters)
    bank = ClusterBank(DIM, args.radius, device=device)
    full = np.empty((args.images * BATCH, DIM), dtype=np.float32)
    t = time.perf_counter()
    for i in range(args.images):
        x = stream.batch(i)
        full[i * BATCH : (i + 1) * BATCH] = x
        bank.add(x)
    build_s = time.perf_counter() - t
    queries = np.concatenate([stream.batch(10**6 + i) for i in range(args.query_images)])
    oc = FlatSearch(np.array(bank.means), device)
    fps_oc = search_fps(oc, queries, args.query_images)
    del oc
    fps_full = search_fps(FlatSearch(full, device), queries, args.query_images)
    gemm = gemm_rate(device)
    flops_per_image = 2.0 * DIM * BATCH
    result = {
        "device": device,
        "images": args.images,
        "full_vectors": int(full.shape[0]),
        "ocbank_centroids": len(bank),
        "ocbank_build_seconds": build_s,
        "ocbank_search_fps": fps_oc,
        "full_search_fps": fps_full,
        "speedup": fps_oc / fps_full,
        "gemm_gflops": gemm,
        "ocbank_search_gemm_fraction": fps_oc * flops_per_image * len(bank) / 1e9 / gemm,
        "full_search_gemm_fraction": fps_full * flops_per_image * full.shape[0] / 1e9 / gemm,
    }
    write_result(args.out, "search.json", result)
    return result


if __name__ == "__main__":
    main()
