"""Throughput on real (WRN50, weights none) features: the radius rule, the build's parts, the inference loop.

Three parts, each writing one JSON under --out (all timings are from one run on
one machine, so the ratios are comparable):

- ``radius``: the exact p99 rule (all patches as queries) against
  :func:`ocbank.model.radius.estimate_radius` on each 224^2 class (50 images,
  39,200 patches): time of each, the estimate's error and interval over many
  seeds for several query counts (-> radius_estimate_cpu.json);
- ``pipeline``: at 224^2, the backbone alone on preprocessed batches against the
  full evaluate loop (decode, resize, features, search, upsample, blur, overlay
  PNGs) with a per-stage breakdown, plus CPU variants (channels_last, threads)
  (-> pipeline_224_cpu.json);
- ``figures``: per class (three textures at 224^2, one at 512^2) the build time of
  a two-pass build (features for the radius images, exact rule, features again +
  bank) beside the one-pass build that ships (features once + linear rule + bank,
  summed from the same measured parts), the radius estimate next to the exact rule,
  the bank's GEMM ratio, and end-to-end img/s next to the backbone (-> figures_cpu.json);
- ``threads``: the predict loop with and without OMP_WAIT_POLICY=PASSIVE
  (-> pipeline_threads_224_cpu.json);
- ``shipped``: ``ocbank predict`` end to end against the backbone alone, interleaved
  rounds (-> pipeline_shipped_224_cpu.json).

python -m benchmarks.bench_pipeline --out benchmarks/results --part radius|pipeline|figures|threads|shipped [--data DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import (
    BENCH_CLASSES,
    DIM,
    PeakMemory,
    detector_config,
    gemm_gflops,
    machine_info,
    make_bench_data,
    real_features,
    stream_build,
    timed,
    write_result,
)

RADIUS_IMAGES = 50
NOTE = "compare ratios within this file only"  # the machine is shared; absolute rates move


# ---------------------------------------------------------------------- radius
def exact_distances(x: np.ndarray, cache: Path, key: str) -> tuple[np.ndarray, float | None]:
    """All nearest-other distances [n] (the exact rule's input), cached; with the seconds it took (None: cached)."""
    from ocbank.model.radius import nearest_other_distances

    path = cache / f"{key}_nearest_other.npy"
    if path.is_file():
        return np.load(path), None
    d, seconds = timed(lambda: nearest_other_distances(np.ascontiguousarray(x)))
    np.save(path, d)
    return d, seconds


def radius_error_sweep(
    dist: np.ndarray, query_counts: tuple[int, ...], seeds: int = 200, confidence: float = 0.95
) -> list[dict[str, Any]]:
    """For each query count m: the estimate's relative error, CI width and coverage of the exact p99 over seeds.

    The estimate is the p99 of the exact distances at m seeded query positions
    (the same draw as estimate_radius, whose exactness per query the tests check),
    so the exact distances computed once serve every seed.
    """
    from ocbank.model.radius import quantile_interval

    exact = float(np.percentile(dist, 99))
    rows = []
    for m in query_counts:
        lo, hi = quantile_interval(m, 99.0, confidence)
        errs, widths, inside = [], [], []
        for seed in range(seeds):
            ids = np.sort(np.random.default_rng(seed).choice(len(dist), size=m, replace=False))
            s = np.sort(dist[ids])
            est = float(np.percentile(s, 99))
            low = s[lo - 1] if lo >= 1 else -np.inf
            high = s[hi - 1] if hi <= m else np.inf
            errs.append(abs(est - exact) / exact)
            widths.append((high - low) / exact)
            inside.append(low <= exact <= high)
        rows.append({
            "queries": m,
            "median_rel_error": float(np.median(errs)),
            "p95_rel_error": float(np.percentile(errs, 95)),
            "max_rel_error": float(np.max(errs)),
            "median_ci_rel_width": float(np.median(widths)),
            "coverage": float(np.mean(inside)),
        })
    return rows


def part_radius(data: Path, cache: Path, out: Path) -> dict[str, Any]:
    from ocbank.model.radius import DEFAULT_MAX_QUERIES, estimate_radius

    result: dict[str, Any] = {"machine": machine_info(note=NOTE), "radius_images": RADIUS_IMAGES, "classes": {}}
    for name in BENCH_CLASSES:
        x = real_features(data / "d224", name, 224, RADIUS_IMAGES, cache)
        dist, exact_s = exact_distances(x, cache, f"{name}_224")
        xa = np.ascontiguousarray(x)
        est, est_s = timed(lambda xa=xa: estimate_radius(xa, max_queries=DEFAULT_MAX_QUERIES, seed=0))
        exact = float(np.percentile(dist, 99))
        result["classes"][name] = {
            "n_patches": int(len(dist)),
            "exact_p99": exact,
            "exact_seconds": exact_s,
            "estimate": est.as_stats(),
            "estimate_seconds": est_s,
            "estimate_rel_error": abs(est.radius - exact) / exact,
            "exact_inside_ci": bool(est.ci_low <= exact <= est.ci_high),
            "sweep": radius_error_sweep(dist, (1024, 2048, 4096, 8192, 16384)),
        }
        print(name, {k: v for k, v in result["classes"][name].items() if k != "sweep"}, flush=True)
    write_result(out, "radius_estimate_cpu.json", result)
    return result


# ---------------------------------------------------------------------- pipeline
def bank_for(data: Path, cache: Path, name: str, size: int) -> tuple[Any, Any]:
    """A Detector for class ``name`` whose bank is built from the cached training features (estimated radius)."""
    from ocbank.engine import ClusterBank
    from ocbank.model.builder import FittedBank
    from ocbank.model.detector import Detector
    from ocbank.model.radius import RadiusStats, estimate_radius

    x = np.ascontiguousarray(real_features(data / f"d{size}", name, size, RADIUS_IMAGES, cache))
    est = estimate_radius(x)
    bank = ClusterBank(DIM, est.radius)
    bank.add(x)
    det = Detector.from_config(detector_config(size))
    det.use_fitted(FittedBank(bank, RadiusStats(est.radius, est, RADIUS_IMAGES)))
    return det, est


def test_samples(root: Path, name: str) -> list[Any]:
    from ocbank.data.datasets import mvtec_split

    return mvtec_split(root, name).test


class StageClock:
    """Accumulates seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - t0
        return now


def instrumented_predict(det: Any, samples: list[Any], out: Path, overlays: int | None) -> dict[str, Any]:
    """jobs.predict's loop with a clock per stage; ``overlays`` = None writes one per image (as predict does)."""
    from ocbank.data.loader import make_loader
    from ocbank.jobs.visualize import map_range, save_overlay
    from ocbank.model.scoring import anomaly_maps, image_scores

    clock = StageClock()
    size = det.config.image_size
    sigma = det.config.scoring.sigma
    vmin, vmax = map_range(det.bank.radius_)
    written = 0
    t_all = t = time.perf_counter()
    loader = iter(make_loader(samples, det.config))
    n = 0
    for batch in loader:
        t = clock.add("decode+resize+normalise (loader)", t)
        feats = det.extractor(batch.image)
        t = clock.add("backbone features", t)
        b, h, w, _ = feats.shape
        dist, _ = det.bank.search(feats.reshape(-1, DIM), k=1)
        t = clock.add("1-NN search", t)
        grid = dist.reshape(b, h, w)
        image_scores(grid)
        maps = anomaly_maps(grid, size, sigma)
        t = clock.add("upsample+blur (anomaly_maps)", t)
        for j in range(b):
            if overlays is None or written < overlays:
                save_overlay(out / f"{n + j:05d}.png", batch.rgb[j], maps[j], vmin, vmax)
                written += 1
        n += b
        t = clock.add("overlay PNGs", t)
    total = time.perf_counter() - t_all
    return {"images": n, "seconds": total, "img_per_s": n / total, "stages_seconds": clock.seconds}


def prefetched_predict(
    det: Any, samples: list[Any], out: Path, overlays: int | None, search: Callable[[np.ndarray], Any] | None = None
) -> dict[str, Any]:
    """The same loop with the loader (decode/resize) running one batch ahead in a thread, overlays top-N only."""
    import queue
    import threading

    from ocbank.data.loader import make_loader
    from ocbank.jobs.visualize import map_range, save_overlay
    from ocbank.model.scoring import anomaly_maps, image_scores

    size = det.config.image_size
    sigma = det.config.scoring.sigma
    vmin, vmax = map_range(det.bank.radius_)
    q: queue.Queue = queue.Queue(maxsize=2)

    def produce() -> None:
        for batch in make_loader(samples, det.config):
            q.put(batch)
        q.put(None)

    t0 = time.perf_counter()
    threading.Thread(target=produce, daemon=True).start()
    n = written = 0
    scores, keep = [], []
    while (batch := q.get()) is not None:
        feats = det.extractor(batch.image)
        b, h, w, _ = feats.shape
        if search is None:
            dist, _ = det.bank.search(feats.reshape(-1, DIM), k=1)
        else:
            dist = np.sqrt(np.maximum(search(feats.reshape(-1, DIM).numpy())[0][:, 0], 0.0))
        grid = dist.reshape(b, h, w)
        scores.append(image_scores(grid))
        maps = anomaly_maps(grid, size, sigma)
        if overlays:  # keep the running top-N (by score) to write at the end
            keep += [(float(scores[-1][j]), batch.rgb[j], maps[j]) for j in range(b)]
            keep = sorted(keep, key=lambda r: -r[0])[:overlays]
        n += b
    for i, (_, rgb, amap) in enumerate(keep):
        save_overlay(out / f"top{i:03d}.png", rgb, amap, vmin, vmax)
        written += 1
    total = time.perf_counter() - t0
    return {"images": n, "seconds": total, "img_per_s": n / total, "overlays_written": written}


def backbone_alone(extractor: Any, batches: list[torch.Tensor]) -> float:
    """img/s of the extractor on preprocessed batches [B, 3, S, S]."""
    t = time.perf_counter()
    n = 0
    for x in batches:
        extractor(x)
        n += len(x)
    return n / (time.perf_counter() - t)


def channels_last(extractor: Any) -> Any:
    """Wrap an extractor so its weights and inputs are channels_last (NHWC, oneDNN's preferred layout on CPU)."""
    extractor.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        return extractor(x.contiguous(memory_format=torch.channels_last))

    return run


def frozen(extractor: Any, example: torch.Tensor, nhwc: bool) -> Any:
    """TorchScript trace + freeze: folds BatchNorm into the convolutions and runs them through oneDNN."""
    with torch.inference_mode(False), torch.no_grad():
        x = example.contiguous(memory_format=torch.channels_last) if nhwc else example
        mod = torch.jit.freeze(torch.jit.trace(extractor.eval(), x, check_trace=False))
        mod(x)
        mod(x)  # the first calls optimise the graph

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return mod(batch.contiguous(memory_format=torch.channels_last) if nhwc else batch)

    return run


def part_pipeline(data: Path, cache: Path, out: Path, rounds: int = 2) -> dict[str, Any]:
    """Backbone alone vs the full predict loop at 224^2, side by side, variants interleaved in rounds."""
    import tempfile

    from ocbank.data.loader import make_loader
    from ocbank.jobs.predict import predict
    from ocbank.model.features import FeatureExtractor

    name = "weave"
    root = data / "d224"
    det, _ = bank_for(data, cache, name, 224)
    samples = test_samples(root, name)
    batches = [b.image for b in make_loader(samples, det.config)]
    ext = det.extractor
    ext(batches[0])  # warm-up
    variants: dict[str, Callable[[], float]] = {"eager (as shipped)": lambda: backbone_alone(ext, batches)}
    ext_cl = FeatureExtractor(weights="none", device="cpu")
    cl = channels_last(ext_cl)
    variants["channels_last"] = lambda: backbone_alone(cl, batches)
    fz = frozen(FeatureExtractor(weights="none", device="cpu"), batches[0], nhwc=False)
    variants["jit.freeze (BN folded, oneDNN)"] = lambda: backbone_alone(fz, batches)
    fz_cl = frozen(FeatureExtractor(weights="none", device="cpu"), batches[0], nhwc=True)
    variants["jit.freeze + channels_last"] = lambda: backbone_alone(fz_cl, batches)

    def one_thread() -> float:
        torch.set_num_threads(1)
        try:
            return backbone_alone(ext, batches)
        finally:
            torch.set_num_threads(threads)

    threads = torch.get_num_threads()
    variants[f"eager, 1 thread (default {threads})"] = one_thread
    for fn in variants.values():
        fn()  # warm every variant once
    bank_file = data / "pipeline_weave.h5"
    det.save(bank_file)
    timings: dict[str, list[float]] = {}
    loops: dict[str, list[dict[str, Any]]] = {"instrumented": [], "prefetch+top8": [], "no overlays": []}
    predict_fps = []
    for _ in range(rounds):
        for key, fn in variants.items():
            timings.setdefault(key, []).append(fn())
        with tempfile.TemporaryDirectory() as tmp:
            loops["instrumented"].append(instrumented_predict(det, samples, Path(tmp), overlays=None))
        with tempfile.TemporaryDirectory() as tmp:
            loops["no overlays"].append(instrumented_predict(det, samples, Path(tmp), overlays=0))
        with tempfile.TemporaryDirectory() as tmp:
            loops["prefetch+top8"].append(prefetched_predict(det, samples, Path(tmp), overlays=8))
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            predict(bank_file, [str(root / name / "test")], tmp, progress=False, device="cpu")
            predict_fps.append(len(samples) / (time.perf_counter() - t))
    backbone = float(np.median(timings["eager (as shipped)"]))
    best = max(loops["instrumented"], key=lambda r: r["img_per_s"])
    result = {
        "machine": machine_info(note=NOTE),
        "image_size": 224,
        "batch_size": det.config.data.batch_size,
        "test_images": len(samples),
        "centroids": len(det.bank),
        "rounds": rounds,
        "backbone_img_per_s": {k: float(np.median(v)) for k, v in timings.items()},
        "backbone_variant_ratio_to_eager": {k: float(np.median(v)) / backbone for k, v in timings.items()},
        "jobs_predict_img_per_s": float(np.median(predict_fps)),
        "jobs_predict_ratio_to_backbone": float(np.median(predict_fps)) / backbone,
        "instrumented_loop": {
            "img_per_s": float(np.median([r["img_per_s"] for r in loops["instrumented"]])),
            "stages_seconds_best_round": best["stages_seconds"],
            "stage_share_best_round": {k: v / best["seconds"] for k, v in best["stages_seconds"].items()},
        },
        "loop_ratio_to_backbone": {
            k: float(np.median([r["img_per_s"] for r in v])) / backbone for k, v in loops.items()
        },
        "loop_img_per_s": {k: float(np.median([r["img_per_s"] for r in v])) for k, v in loops.items()},
    }
    write_result(out, "pipeline_224_cpu.json", result)
    return result


# ---------------------------------------------------------------------- figures
def time_features(root: Path, name: str, size: int, n_images: int, extractor: Any) -> float:
    """Seconds to run ``n_images`` training images through the loader and the backbone (the build's feature pass)."""
    from ocbank.data.datasets import mvtec_split
    from ocbank.model.detector import Detector

    det = Detector.from_config(detector_config(size), extractor=extractor)
    samples = mvtec_split(root, name).train[:n_images]
    t = time.perf_counter()
    for _ in det.features(samples):
        pass
    return time.perf_counter() - t


def figures_for(data: Path, cache: Path, name: str, size: int, extractor: Any, exact_limit: int) -> dict[str, Any]:
    """One class's build breakdown (two-pass vs the one-pass build that ships), radius rule and bank GEMM ratio."""
    from ocbank.model.radius import DEFAULT_MAX_QUERIES, estimate_radius, nearest_other_distances


    root = data / f"d{size}"
    x = np.ascontiguousarray(real_features(root, name, size, RADIUS_IMAGES, cache))
    n = len(x)
    features_s = time_features(root, name, size, RADIUS_IMAGES, extractor)
    est, linear_s = timed(lambda: estimate_radius(x, max_queries=DEFAULT_MAX_QUERIES, seed=0))
    row: dict[str, Any] = {"image_size": size, "images": RADIUS_IMAGES, "patches": n,
                           "features_seconds_per_pass": features_s, "linear_rule_seconds": linear_s,
                           "estimate": est.as_stats()}
    if n <= exact_limit:
        dist, exact_s = timed(lambda: nearest_other_distances(x))
        exact = float(np.percentile(dist, 99))
        row.update(exact_rule_seconds=exact_s, exact_rule_measured=True, exact_p99=exact,
                   estimate_rel_error=abs(est.radius - exact) / exact,
                   exact_inside_ci=bool(est.ci_low <= exact <= est.ci_high))
    else:
        # All-pairs is out of reach here: project it from the measured linear rule (same kernel, n / m times the work).
        row.update(exact_rule_seconds=linear_s * n / est.n_queries, exact_rule_measured=False,
                   exact_p99=None, note="exact rule projected as linear_rule_seconds * n / queries")
    per_image = (size // 8) ** 2
    with PeakMemory(str(extractor.device)) as bank_memory:
        run = stream_build((x[i : i + per_image] for i in range(0, n, per_image)), est.radius)
    row["bank_build_device_memory"] = bank_memory.to_dict()
    gemm = gemm_gflops(run["k"])
    eff = run["flops"] / run["seconds"] / 1e9
    row.update(bank_seconds=run["seconds"], bank_centroids=run["k"], bank_vectors_per_s=n / run["seconds"],
               bank_effective_gflops=eff, gemm_gflops=gemm, bank_gemm_ratio=eff / gemm)
    two_pass = 2 * features_s + row["exact_rule_seconds"] + run["seconds"]
    one_pass = features_s + linear_s + run["seconds"]
    row["build_two_pass_seconds"] = {"total": two_pass, "features (radius images)": features_s,
                                     "exact rule": row["exact_rule_seconds"], "features (build pass)": features_s,
                                     "bank": run["seconds"]}
    row["build_one_pass_projected_seconds"] = {"total": one_pass, "features (once)": features_s,
                                               "linear rule": linear_s, "bank": run["seconds"]}
    row["one_pass_speedup"] = two_pass / one_pass
    print(name, size, {k: v for k, v in row.items() if k != "estimate"}, flush=True)
    return row


def part_figures(data: Path, cache: Path, out: Path) -> dict[str, Any]:
    import tempfile

    from ocbank.data.loader import make_loader
    from ocbank.model.features import FeatureExtractor

    make_bench_data(data / "d512", ("grain",), 512, RADIUS_IMAGES, 4)
    extractor = FeatureExtractor(weights="none", device="cpu")
    result: dict[str, Any] = {"machine": machine_info(note=NOTE), "classes": {}}
    for name in BENCH_CLASSES:
        result["classes"][f"{name}_224"] = figures_for(data, cache, name, 224, extractor, exact_limit=50_000)
    result["classes"]["grain_512"] = figures_for(data, cache, "grain", 512, extractor, exact_limit=50_000)
    # End to end next to the backbone alone (224^2, weave's test set), interleaved twice.
    det, _ = bank_for(data, cache, "weave", 224)
    det._extractor = extractor
    samples = test_samples(data / "d224", "weave")
    batches = [b.image for b in make_loader(samples, det.config)]
    backbone, e2e = [], []
    with PeakMemory(str(extractor.device)) as score_memory:
        for _ in range(2):
            backbone.append(backbone_alone(extractor, batches))
            with tempfile.TemporaryDirectory() as tmp:
                e2e.append(instrumented_predict(det, samples, Path(tmp), overlays=None)["img_per_s"])
    result["e2e_224"] = {"backbone_img_per_s": float(np.median(backbone)), "e2e_img_per_s": float(np.median(e2e)),
                         "ratio": float(np.median(e2e)) / float(np.median(backbone)), "test_images": len(samples),
                         "score_device_memory": score_memory.to_dict()}
    write_result(out, "figures_cpu.json", result)
    return result


# ---------------------------------------------------------------------- loop variants (one process each)
def loop_variant(bank_file: Path, samples_root: Path, name: str) -> dict[str, Any]:
    """In this process: backbone alone, the loop as shipped, prefetch + top-8 overlays (flat, then IVF search)."""
    import tempfile

    from ocbank.data.loader import make_loader
    from ocbank.engine.ivf import IvfSearch
    from ocbank.model.detector import Detector

    det = Detector.load(bank_file, device="cpu")
    samples = test_samples(samples_root, name)
    batches = [b.image for b in make_loader(samples, det.config)]
    det.extractor(batches[0])
    ivf = IvfSearch.from_means(np.ascontiguousarray(det.bank.means))
    res: dict[str, Any] = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                           "ivf": {"nlist": ivf.params.nlist, "nprobe": ivf.params.nprobe}}
    res["backbone_img_per_s"] = backbone_alone(det.extractor, batches)
    with tempfile.TemporaryDirectory() as tmp:
        shipped = instrumented_predict(det, samples, Path(tmp), overlays=None)
    res["loop_as_shipped_img_per_s"] = shipped["img_per_s"]
    res["loop_as_shipped_stages_seconds"] = shipped["stages_seconds"]
    with tempfile.TemporaryDirectory() as tmp:
        res["prefetch_top8_img_per_s"] = prefetched_predict(det, samples, Path(tmp), overlays=8)["img_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        res["prefetch_top8_ivf_img_per_s"] = prefetched_predict(det, samples, Path(tmp), overlays=8,
                                                                 search=ivf.search)["img_per_s"]
    res["backbone_img_per_s_again"] = backbone_alone(det.extractor, batches)
    return res


def part_threads(data: Path, out: Path) -> dict[str, Any]:
    """The loop variants in fresh processes with OMP_WAIT_POLICY unset vs PASSIVE (torch and faiss each run an
    OpenMP pool; with the default spin-wait, faiss's idle threads compete with the backbone on 2 cores)."""
    import json
    import subprocess
    import sys

    bank_file = data / "pipeline_weave.h5"
    if not bank_file.is_file():
        msg = f"{bank_file} is missing: run --part pipeline first (it saves the bank)."
        raise SystemExit(msg)
    runs = {}
    for policy in (None, "PASSIVE", None, "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        code = ("import json,sys; from pathlib import Path; from benchmarks.bench_pipeline import loop_variant; "
                f"print('RESULT', json.dumps(loop_variant(Path({str(bank_file)!r}), Path({str(data / 'd224')!r}), "
                "'weave')))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        res = json.loads(line[len("RESULT "):])
        runs.setdefault(policy or "default", []).append(res)
        print(policy, {k: v for k, v in res.items() if "stages" not in k}, flush=True)
    summary = {}
    for policy, rs in runs.items():
        bb = float(np.median([(r["backbone_img_per_s"] + r["backbone_img_per_s_again"]) / 2 for r in rs]))
        summary[policy] = {"backbone_img_per_s": bb, **{
            f"{k}_ratio_to_backbone": float(np.median([r[k] for r in rs])) / bb
            for k in ("loop_as_shipped_img_per_s", "prefetch_top8_img_per_s", "prefetch_top8_ivf_img_per_s")}}
    result = {"machine": machine_info(note=NOTE), "summary": summary, "runs": runs}
    write_result(out, "pipeline_threads_224_cpu.json", result)
    return result


def part_shipped(data: Path, out: Path, rounds: int = 3) -> dict[str, Any]:
    """The predict loop as shipped (decode prefetched in a thread) against the backbone alone, in one process.

    Interleaved rounds on the weave test images at 224^2: the backbone on preloaded batches, then
    ``jobs.predict`` with an overlay per image (the default) and with ``--overlays none``.
    """
    import tempfile

    from ocbank.data.loader import make_loader
    from ocbank.jobs.predict import predict
    from ocbank.model.detector import Detector

    bank_file = data / "pipeline_weave.h5"
    if not bank_file.is_file():
        msg = f"{bank_file} is missing: run --part pipeline first (it saves the bank)."
        raise SystemExit(msg)
    det = Detector.load(bank_file, device="cpu")
    samples = test_samples(data / "d224", "weave")
    batches = [b.image for b in make_loader(samples, det.config)]
    det.extractor(batches[0])  # warm up
    folder = [str(data / "d224" / "weave" / "test")]
    res: dict[str, list[float]] = {"backbone": [], "predict_overlays_all": [], "predict_overlays_none": []}
    for _ in range(rounds):
        res["backbone"].append(backbone_alone(det.extractor, batches))
        for key, overlays in (("predict_overlays_all", "all"), ("predict_overlays_none", "none")):
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                rows = predict(bank_file, folder, tmp, device="cpu", overlays=overlays)
                res[key].append(len(rows) / (time.perf_counter() - t))
    bb = float(np.median(res["backbone"]))
    result = {
        "machine": machine_info(note=NOTE),
        "images": len(samples),
        "img_per_s": res,
        "ratio_to_backbone": {k: float(np.median(v)) / bb for k, v in res.items() if k != "backbone"},
        "note": "predict includes loading the bank and the backbone once per call; medians of interleaved rounds",
    }
    write_result(out, "pipeline_shipped_224_cpu.json", result)
    print(result["ratio_to_backbone"], flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--data", default="/tmp/ocb_bench", help="scratch folder for images and cached features")
    ap.add_argument("--part", required=True, choices=["radius", "pipeline", "figures", "threads", "shipped"])
    args = ap.parse_args(argv)
    data = Path(args.data)
    cache = data / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    make_bench_data(data / "d224", BENCH_CLASSES, 256, 60, 10)
    out = Path(args.out)
    if args.part == "radius":
        return part_radius(data, cache, out)
    if args.part == "pipeline":
        return part_pipeline(data, cache, out)
    if args.part == "threads":
        return part_threads(data, out)
    if args.part == "shipped":
        return part_shipped(data, out)
    return part_figures(data, cache, out)


if __name__ == "__main__":
    main()
