"""Search-only FPS at Real-IAD scale: ocbank's bank against PatchCore's full bank.

A synthetic stand-in for one Real-IAD class: ``--images`` training images x 784
patches (default 1,200 x 784 = 940,800 vectors, 5.8 GB as a full bank), streamed
into a ClusterBank; both banks then answer 1-NN queries for batches of 32 test
images with the same FAISS call. Meant for a GPU; on CPU use small --images.

python -m benchmarks.bench_search --out DIR [--device cuda] [--images 1200]

--ivf (CPU, search only): ocbank.engine.ivf.IvfSearch against exact flat search
(faiss.knn) on (a) real WRN50 (weights none) patch features of three texture
classes used as a 117,600-centroid bank, queried with the test images' patches,
and (b) 120k+ synthetic clustered centroids with held-out queries; recall@1, the
max / mean relative error of the 1-NN distance and the speed-up per nprobe; and
(c) the change in image AUROC on the demo data (ocbank.synthetic, demo config)
when each class's bank is searched through IVF instead of flat -> ivf_cpu.json.

python -m benchmarks.bench_search --out benchmarks/results --ivf [--data /tmp/ocb_bench]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ocbank import ClusterBank
from ocbank.engine.device import resolve_device

from .common import (
    BATCH,
    BENCH_CLASSES,
    DIM,
    ClusteredStream,
    FlatSearch,
    gemm_rate,
    machine_info,
    make_bench_data,
    real_features,
    write_result,
)


def search_fps(search: FlatSearch, queries: np.ndarray, images: int, repeats: int = 5) -> float:
    search(queries)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        search(queries)
        times.append(time.perf_counter() - t)
    return images / float(np.median(times))


def _ivf_sweep(means: np.ndarray, queries: np.ndarray, nprobes: tuple[int, ...], repeats: int = 2) -> dict:
    """Flat vs IVF on one set of means: build time, and per nprobe recall@1, distance errors, time and speed-up."""
    import faiss

    from ocbank.engine.ivf import IvfSearch, default_nprobe

    t = time.perf_counter()
    flat_sq, flat_ids = faiss.knn(queries, means, 1)
    flat_s = time.perf_counter() - t
    t = time.perf_counter()
    ivf = IvfSearch.from_means(means, seed=0)
    build_s = time.perf_counter() - t
    sizes = np.array([ivf.index.invlists.list_size(i) for i in range(ivf.params.nlist)])
    lists = {"mean": float(sizes.mean()), "max": int(sizes.max()), "empty": int((sizes == 0).sum()),
             "largest_10_share": float(np.sort(sizes)[-10:].sum() / sizes.sum())}
    print("list sizes", lists, flush=True)
    exact = np.sqrt(np.maximum(flat_sq[:, 0], 0.0)).astype(np.float64)
    rows = []
    for nprobe in nprobes:
        if nprobe > ivf.params.nlist:
            continue
        ivf.with_nprobe(nprobe)
        ivf.search(queries[:64])
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            sq, ids = ivf.search(queries)
            times.append(time.perf_counter() - t)
        got = np.sqrt(np.maximum(sq[:, 0], 0.0)).astype(np.float64)
        rel = (got - exact) / np.maximum(exact, 1e-12)
        rows.append({
            "nprobe": nprobe,
            "recall_at_1": float(np.mean(ids[:, 0] == flat_ids[:, 0])),
            # A different id at a distance equal up to float rounding (flat uses the GEMM form): a tie, not a miss.
            "same_distance_fraction": float(np.mean(np.abs(rel) <= 1e-3)),
            "max_rel_distance_error": float(rel.max()),
            "mean_rel_distance_error": float(rel.mean()),
            "seconds": float(np.median(times)),
            "speedup_vs_flat": flat_s / float(np.median(times)),
        })
        print(rows[-1], flush=True)
    return {"n_centroids": int(len(means)), "n_queries": int(len(queries)), "nlist": ivf.params.nlist,
            "default_nprobe": default_nprobe(ivf.params.nlist), "flat_seconds": flat_s,
            "ivf_build_seconds": build_s, "list_sizes": lists, "sweep": rows}


def _demo_auroc(data: Path, nprobes: tuple[int, ...] = (8, 16, 32, 64)) -> dict:
    """Image AUROC per demo class with the bank searched flat vs through IVF (default nlist; nprobe swept)."""
    import faiss

    from ocbank import config as config_mod
    from ocbank.data.datasets import mvtec_split
    from ocbank.engine.ivf import IvfSearch
    from ocbank.model import metrics
    from ocbank.model.detector import Detector
    from ocbank.model.features import FEATURE_DIM
    from ocbank.synthetic import make_dataset

    root = data / "demo_data"
    if not root.is_dir():
        make_dataset(root)
    cfg = config_mod.load(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                          overrides={"data": {"root": str(root)}})
    out = {}
    extractor = None
    for name in ("weave", "dots"):
        split = mvtec_split(root, name)
        det = Detector.from_config(cfg, extractor=extractor).fit(split.train)
        extractor = det.extractor
        means = np.ascontiguousarray(det.bank.means)
        ivf = IvfSearch.from_means(means)
        default = ivf.params.nprobe
        probes = sorted({p for p in (*nprobes, ivf.params.nprobe) if p <= ivf.params.nlist} | {ivf.params.nlist})
        labels, flat_scores = [], []
        ivf_scores: dict[int, list[float]] = {p: [] for p in probes}
        for batch, feats in det.features(split.test):
            q = np.ascontiguousarray(feats.reshape(-1, FEATURE_DIM).numpy())
            b = len(batch.index)
            flat_scores += np.sqrt(np.maximum(faiss.knn(q, means, 1)[0][:, 0], 0)).reshape(b, -1).max(1).tolist()
            for p in probes:
                sq = ivf.with_nprobe(p).search(q)[0][:, 0]
                ivf_scores[p] += np.sqrt(np.maximum(sq, 0)).reshape(b, -1).max(1).tolist()
            labels += [split.test[i].label for i in batch.index]
        a_flat = metrics.image_auroc(np.array(labels), np.array(flat_scores))
        sweep = []
        for p in probes:
            a_ivf = metrics.image_auroc(np.array(labels), np.array(ivf_scores[p]))
            change = np.abs(np.array(ivf_scores[p]) - np.array(flat_scores))
            sweep.append({"nprobe": p, "image_auroc_ivf": a_ivf, "abs_change": abs(a_ivf - a_flat),
                          "max_abs_score_change": float(change.max()),
                          "max_rel_score_change": float((change / np.array(flat_scores)).max())})
        out[name] = {"centroids": len(means), "nlist": ivf.params.nlist, "default_nprobe_at_run": default,
                     "n_test": len(labels), "image_auroc_flat": a_flat, "sweep": sweep}
        print(name, out[name], flush=True)
    return out


def ivf_main(args: argparse.Namespace) -> dict:
    data = Path(args.data)
    rng = np.random.default_rng(0)
    nprobes = (1, 2, 4, 8, 16, 32)
    result: dict = {"machine": machine_info()}
    root = make_bench_data(data / "d224", BENCH_CLASSES, 256, 60, 10)
    means = np.ascontiguousarray(np.concatenate([real_features(root, c, 224, 50, data / "cache")
                                                 for c in BENCH_CLASSES]))
    test = np.concatenate([real_features(root, c, 224, 8, data / "cache", split="test") for c in BENCH_CLASSES])
    queries = np.ascontiguousarray(test[np.sort(rng.choice(len(test), args.ivf_queries, replace=False))])
    result["real_features_as_centroids"] = _ivf_sweep(means, queries, nprobes)
    del means
    stream = ClusteredStream(args.clusters)
    n_batches = -(-args.ivf_centroids // BATCH)
    syn = np.concatenate([stream.batch(i) for i in range(n_batches)])
    # Fewer queries: on isotropic Gaussian clusters k-means collapses into a few giant lists (see list_sizes),
    # so every probe is slow; 300 queries show it.
    syn_q = np.concatenate([stream.batch(10**6 + i) for i in range(1)])[:300]
    result["synthetic_clustered"] = _ivf_sweep(syn, syn_q, (1, 4, 16), repeats=1)
    del syn
    result["demo_image_auroc"] = _demo_auroc(data)
    write_result(args.out, "ivf_cpu.json", result)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--clusters", type=int, default=20000)
    ap.add_argument("--radius", type=float, default=26.0)
    ap.add_argument("--query-images", type=int, default=32)
    ap.add_argument("--ivf", action="store_true", help="IVF vs flat search on CPU (see above)")
    ap.add_argument("--ivf-centroids", type=int, default=120_000)
    ap.add_argument("--ivf-queries", type=int, default=3000)
    ap.add_argument("--ivf-demo-only", action="store_true", help="with --ivf: redo only the demo AUROC part")
    ap.add_argument("--data", default="/tmp/ocb_bench", help="scratch folder for images and cached features")
    args = ap.parse_args(argv)
    if args.ivf and args.ivf_demo_only:
        import json

        path = Path(args.out) / "ivf_cpu.json"
        result = json.loads(path.read_text()) if path.is_file() else {}
        result["demo_image_auroc"] = _demo_auroc(Path(args.data))
        write_result(args.out, "ivf_cpu.json", result)
        return result
    if args.ivf:
        return ivf_main(args)
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
        "machine": machine_info(device),
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
