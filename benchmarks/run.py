"""ocbank against PatchCore, PaDiM and SPADE on identical features: memory, speed and accuracy.

python -m benchmarks.run --config CFG --out DIR [--classes a,b] [--radii 20,24,28 | auto] [--smoke] [--shards N]
                         [--modes nn,local_mean,local_gauss] [--exemplars 0.02] [--baselines padim,spade,spade_k5]
                         [--features FEATS.npz]

Features are extracted once per class (or read from ``--features``); every
method then runs on exactly those features and the same split:

- ``ocbank``: ClusterBank at the config's radius (``auto``: the p99 rule), or
  each radius of ``--radii`` (a sweep like the method's Table 3);
- ``ocbank_exemplars``: the same bank plus its edge exemplars, the ``--exemplars``
  fraction of training patches farthest from their centroid, kept raw;
- ``patchcore_full``: every training patch in a flat index;
- ``patchcore_coreset``: PatchCore's approximate greedy coreset at 10% and 1%;
- ``ocbank_sharded`` (with ``--shards N``): N contiguous shards merged with
  ClusterBank.merge, reported against the sequential bank (K and AUROC deltas);
- ``padim``, ``spade``, ``spade_k5``: the baselines of benchmarks/baselines.py.

All 1-NN banks are searched by the same flat 1-NN code (faiss.knn / faiss.knn_gpu)
and reported once per image-score mode of ``--modes`` (ocbank.model.scoring:
``nn`` = max of the patch grid, ``local_mean`` = max of its 3x3 means,
``local_gauss`` = max after a sigma = 1 patch blur); the modes share the search,
so pixel AUROC and AUPRO are the same for all of a bank's modes.
Writes DIR/results.json (a list of rows, one per method, setting, mode and class),
DIR/results.md, DIR/r_sweep.png (image AUROC against bank MB, every method),
DIR/memory_growth.png and DIR/run_info.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from ocbank import ClusterBank, config
from ocbank.data import class_names, load_split
from ocbank.engine.device import resolve_device
from ocbank.model import metrics, scoring
from ocbank.model.detector import Detector
from ocbank.model.features import FEATURE_DIM
from ocbank.model.radius import radius_statistics, sample_images
from ocbank.model.scoring import anomaly_maps

from .baselines import Padim, Spade, SpadeParams
from .common import ClassFeatures, FlatSearch, PeakMemory, extract, gemm_rate, load_features
from .exemplars import edge_exemplars
from .patchcore import greedy_coreset

SEARCH_BATCH_IMAGES = 32
MODE_WINDOW = 3  # scoring.local_mean window (the measured choice)


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


Scorer = Callable[[np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]


def evaluate_scorer(score: Scorer, cf: ClassFeatures, cfg: config.Config,
                    modes: tuple[str, ...] = (), device: str = "cpu") -> dict[str, Any] | list[dict[str, Any]]:
    """Search/score timing, maps and metrics for one method on one class's test features.

    ``score`` maps a batch of test features [b, h, w, C] to (patch scores
    [b, h, w], image scores [b] or None). None means the maximum of the blurred
    map (PaDiM); 1-NN banks give the maximum of the patch grid. With ``modes``
    (1-NN banks), one dict per scoring mode comes back: the search and the maps
    are shared, the image scores come from ``scoring.image_scores`` and
    each mode's own (small) time is added to the search time. ``score_device_memory``
    is the peak device memory of the search passes on ``device`` (null on the CPU).
    """
    n = cf.test.shape[0]
    size = cfg.image_size
    sigma = cfg.scoring.sigma
    batches = [np.ascontiguousarray(cf.test[lo : lo + SEARCH_BATCH_IMAGES]) for lo in range(0, n, SEARCH_BATCH_IMAGES)]
    score(batches[0])  # warm up
    # Search alone: repeat whole passes (at least 3 unless a pass takes over 3 s; about a second) and keep
    # the median.
    passes: list[float] = []
    with PeakMemory(device) as device_memory:
        while (len(passes) < 3 and sum(passes) < 3.0) or (sum(passes) < 1.0 and len(passes) < 50):
            t = time.perf_counter()
            results = [score(q) for q in batches]
            passes.append(time.perf_counter() - t)
    t_search = float(np.median(passes))
    t = time.perf_counter()
    maps = [anomaly_maps(g, size, sigma) for g, _ in results]
    t_maps = time.perf_counter() - t
    all_maps = np.concatenate(maps)
    pixel = {"pixel_auroc": metrics.pixel_auroc(cf.masks, all_maps), "aupro": metrics.aupro(cf.masks, all_maps)}

    def summary(img: np.ndarray, extra_seconds: float) -> dict[str, Any]:
        return {"search_fps": n / (t_search + extra_seconds),
                "e2e_fps": n / (cf.feature_seconds_per_image * n + t_search + extra_seconds + t_maps),
                "image_auroc": metrics.image_auroc(cf.labels, img), **pixel,
                "score_device_memory": device_memory.to_dict()}

    if not modes:
        if results[0][1] is None:
            return summary(all_maps.reshape(n, -1).max(axis=1), 0.0)
        return summary(np.concatenate([s for _, s in results]), 0.0)
    grid = np.concatenate([g for g, _ in results])
    out = []
    for mode in modes:
        t = time.perf_counter()
        img = scoring.image_scores(grid, mode, MODE_WINDOW)
        out.append(summary(img, time.perf_counter() - t))
    return out


def evaluate_bank(vectors: np.ndarray, cf: ClassFeatures, cfg: config.Config, device: str,
                  modes: tuple[str, ...] = ("nn",)) -> list[dict[str, Any]]:
    """1-NN against a [K, C] bank -> one metrics dict per image-score mode (scoring)."""
    search = FlatSearch(vectors, device)

    def score(feats: np.ndarray) -> tuple[np.ndarray, None]:
        b, h, w, c = feats.shape
        return search(feats.reshape(-1, c)).reshape(b, h, w), None

    return evaluate_scorer(score, cf, cfg, modes, device)


def measure_build(build: Callable[[], Any], device: str) -> tuple[Any, dict[str, Any]]:
    """``build()`` with its seconds, peak RSS and peak device memory (null on the CPU)."""
    with PeakRSS() as rss, PeakMemory(device) as device_memory:
        t = time.perf_counter()
        vectors = build()
        seconds = time.perf_counter() - t
    info = {"build_seconds": seconds, "peak_memory_bytes": rss.peak, "build_device_memory": device_memory.to_dict()}
    return vectors, info


def ocbank_vectors(patches: np.ndarray, radius: float, device: str) -> np.ndarray:
    bank = ClusterBank(FEATURE_DIM, radius, device=device)
    per_image = patches.shape[1] * patches.shape[2]
    flat = patches.reshape(-1, FEATURE_DIM)
    for lo in range(0, flat.shape[0], per_image):
        bank.add(flat[lo : lo + per_image])
    return np.array(bank.means)


def exemplar_vectors(patches: np.ndarray, radius: float, fraction: float, device: str) -> np.ndarray:
    """The bank's centroids followed by its edge exemplars (benchmarks/exemplars.py): [K + E, C].

    One flat 1-NN search over both is the smaller of the two distances (exemplars.with_exemplars).
    """
    means = ocbank_vectors(patches, radius, device)
    flat = np.ascontiguousarray(patches.reshape(-1, FEATURE_DIM))
    residuals = FlatSearch(means, device)(flat)
    return np.concatenate([means, flat[edge_exemplars(residuals, fraction)]])


def sharded_vectors(patches: np.ndarray, radius: float, shards: int, device: str) -> np.ndarray:
    """Contiguous shards of the training images, each built alone, merged in order."""
    merged = ClusterBank(FEATURE_DIM, radius, device=device)
    for part in np.array_split(np.arange(len(patches)), shards):
        shard = ClusterBank(FEATURE_DIM, radius)
        for i in part:
            shard.add(patches[i].reshape(-1, FEATURE_DIM))
        merged.merge(shard)
    return np.array(merged.means)


def auto_radius(cf: ClassFeatures, cfg: config.Config) -> float:
    chosen = sample_images(len(cf.train), cfg.bank.radius_images, cfg.bank.seed)
    return radius_statistics(cf.train[chosen].reshape(-1, FEATURE_DIM))["suggested"]


def memory_growth(cf: ClassFeatures, radius: float) -> dict[str, list[float]]:
    bank = ClusterBank(FEATURE_DIM, radius)
    per_image = cf.train.shape[1] * cf.train.shape[2]
    images, ocb, full = [], [], []
    for i, img in enumerate(cf.train, start=1):
        bank.add(img.reshape(-1, FEATURE_DIM))
        images.append(i)
        ocb.append(bank.nbytes)
        full.append(i * per_image * FEATURE_DIM * 4)
    return {"images": images, "ocbank_bytes": ocb, "full_bytes": full}


BASELINES: dict[str, Callable[[], Any]] = {
    "padim": lambda: Padim(),
    "spade": lambda: Spade(),  # the paper's K = 50 images (capped at n_train), kappa = 1
    "spade_k5": lambda: Spade(SpadeParams(k_images=5)),  # SPADE-pytorch's K = 5
}


BASELINE_LABELS = {"padim": "PaDiM (550 of 1536 dims)", "spade": "SPADE K=50 (capped), kappa=1",
                   "spade_k5": "SPADE K=5, kappa=1"}


def baseline_rows(cf: ClassFeatures, cfg: config.Config, names: list[str]) -> list[dict[str, Any]]:
    """PaDiM / SPADE rows on the same features (numpy + FAISS on the CPU)."""
    rows = []
    for name in names:
        model, info = measure_build(lambda name=name: BASELINES[name]().fit(cf.train), "cpu")
        n, h, w, _ = cf.train.shape
        units = h * w if name == "padim" else n * h * w  # Gaussians / stored patches
        rows.append({"method": name, "class": cf.name, "bank_vectors": int(units), "bank_bytes": model.nbytes, **info,
                     **evaluate_scorer(model.score, cf, cfg), "device": "cpu",
                     "n_train": int(cf.train.shape[0]), "n_test": int(cf.test.shape[0])})
    return rows


def bank_bytes(method: str, vectors: np.ndarray, setting: dict[str, Any]) -> int:
    """float32 vectors, + an int64 count per centroid for ocbank (exemplars are raw patches: no count)."""
    if method == "ocbank_exemplars":
        k = len(vectors) - int(setting["n_exemplars"])
        return k * (FEATURE_DIM * 4 + 8) + int(setting["n_exemplars"]) * FEATURE_DIM * 4
    return int(vectors.shape[0] * (FEATURE_DIM * 4 + (8 if method.startswith("ocbank") else 0)))


def run_class(
    cf: ClassFeatures, cfg: config.Config, radii: list[Any], device: str, smoke: bool, shards: int = 1,
    baselines: list[str] | None = None, modes: tuple[str, ...] = ("nn",), exemplars: float = 0.0,
) -> list[dict[str, Any]]:
    rows = []
    flat = cf.train.reshape(-1, FEATURE_DIM)
    settings: list[tuple[str, dict[str, Any], Callable[[], np.ndarray]]] = []
    for r in radii:
        radius = auto_radius(cf, cfg) if r == "auto" else float(r)
        settings.append(("ocbank", {"radius": radius, "radius_setting": r},
                         lambda radius=radius: ocbank_vectors(cf.train, radius, device)))
    for method, setting, _ in list(settings):
        if method == "ocbank" and exemplars > 0:
            settings.append(("ocbank_exemplars", {**setting, "exemplar_fraction": exemplars},
                             lambda radius=setting["radius"]: exemplar_vectors(cf.train, radius, exemplars, device)))
    if shards > 1:
        radius, r = settings[0][1]["radius"], settings[0][1]["radius_setting"]
        settings.append(("ocbank_sharded", {"radius": radius, "radius_setting": r, "shards": shards},
                         lambda: sharded_vectors(cf.train, radius, shards, device)))
    settings.append(("patchcore_full", {}, lambda: flat))
    for ratio in (0.1,) if smoke else (0.1, 0.01):
        settings.append(("patchcore_coreset", {"coreset_ratio": ratio},
                         lambda ratio=ratio: flat[greedy_coreset(flat, ratio, device=device)]))
    for method, setting, build in settings:
        vectors, info = measure_build(build, device)
        if method == "ocbank_exemplars":  # E = the vectors beyond the same radius's plain bank
            plain = next(r for r in rows if r["method"] == "ocbank" and r["radius"] == setting["radius"])
            setting = {**setting, "n_exemplars": int(len(vectors) - plain["bank_vectors"])}
        # every image-score mode on the same bank and the same search
        for mode, result in zip(modes, evaluate_bank(vectors, cf, cfg, device, modes), strict=True):
            row = {"method": method, "class": cf.name, **setting, "scoring": mode,
                   "bank_vectors": int(vectors.shape[0]), "bank_bytes": bank_bytes(method, vectors, setting),
                   **info, **result, "device": device,
                   "n_train": int(cf.train.shape[0]), "n_test": int(cf.test.shape[0])}
            if method == "ocbank_sharded":  # against the sequential bank at the same radius and mode
                seq = next(r for r in rows if r["method"] == "ocbank" and r["scoring"] == mode)
                row["k_minus_sequential"] = row["bank_vectors"] - seq["bank_vectors"]
                row["image_auroc_minus_sequential"] = row["image_auroc"] - seq["image_auroc"]
            rows.append(row)
    return rows + baseline_rows(cf, cfg, baselines or [])


def write_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    def label(r: dict[str, Any], per_class: bool = True) -> str:
        text = base_label(r, per_class)
        return text if r.get("scoring", "nn") == "nn" else f"{text} + {r['scoring'].replace('_', ' ')}"

    def base_label(r: dict[str, Any], per_class: bool) -> str:
        if r["method"].startswith("ocbank"):
            name = r["method"].replace("_", " ")
            if "exemplar_fraction" in r:
                name = f"ocbank + {100 * r['exemplar_fraction']:g}% edge exemplars"
            if r["radius_setting"] == "auto":
                return f"{name} r=auto ({r['radius']:.2f})" if per_class else f"{name} r=auto (p99 rule)"
            return f"{name} r={r['radius']:.2f}"
        if r["method"] == "patchcore_coreset":
            return f"patchcore coreset {100 * r['coreset_ratio']:g}%"
        if r["method"] in BASELINE_LABELS:
            return BASELINE_LABELS[r["method"]]
        return r["method"].replace("_", " ")

    def pct(v: float) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}"

    lines = [f"# Benchmark results ({meta['device']}, {meta['machine']})", "",
             f"fp32 GEMM: {meta['gemm_gflops']:.1f} GFLOP/s, measured in the same run.", ""]
    head = "| method | vectors | bank MB | build s | search img/s | e2e img/s | img AUROC | pix AUROC | AUPRO |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for name in [*dict.fromkeys(r["class"] for r in rows), "mean"]:
        sub = [r for r in rows if r["class"] == name] if name != "mean" else None
        if sub is None:
            groups: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                groups.setdefault(label(r, per_class=False), []).append(r)
            keys = ("bank_vectors", "bank_bytes", "build_seconds", "search_fps", "e2e_fps", "image_auroc",
                    "pixel_auroc", "aupro")
            sub = [{"label": k, **{key: float(np.nanmean([g[key] for g in v])) for key in keys}}
                   for k, v in groups.items()]
        lines += [f"## {name}", "", head, sep]
        for r in sub:
            lines.append(
                f"| {r.get('label') or label(r)} | {r['bank_vectors']:.0f} | {r['bank_bytes'] / 1e6:.2f} | "
                f"{r['build_seconds']:.2f} | {r['search_fps']:.1f} | {r['e2e_fps']:.1f} | {pct(r['image_auroc'])} | "
                f"{pct(r['pixel_auroc'])} | {pct(r['aupro'])} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def plot_r_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Image AUROC against bank memory: ocbank per scoring mode (a line over radii) and every other method.

    One panel per class and one for the mean over classes, on one figure.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    def series(sub: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for r in sub:
            if r["method"] == "ocbank_sharded":
                continue
            key = "patchcore coreset" if r["method"] == "patchcore_coreset" else r["method"].replace("_", " ")
            if "scoring" in r:
                key += f" ({r['scoring'].replace('_', ' ')})"
            out.setdefault(key, []).append((r["bank_bytes"] / 1e6, r["image_auroc"]))
        return {k: sorted(v) for k, v in out.items()}

    names = list(dict.fromkeys(r["class"] for r in rows))
    panels = [(n, [r for r in rows if r["class"] == n]) for n in names]
    if len(names) > 1:  # the mean over classes of each (method, setting)
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in rows:
            key = (r["method"], r.get("scoring", "nn"), r.get("radius_setting"), r.get("coreset_ratio"))
            groups.setdefault(key, []).append(r)
        mean = [{**g[0], "bank_bytes": float(np.mean([x["bank_bytes"] for x in g])),
                 "image_auroc": float(np.nanmean([x["image_auroc"] for x in g]))} for g in groups.values()]
        panels.append(("mean over classes", mean))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, sub) in zip(axes[0], panels, strict=True):
        for key, pts in series(sub).items():
            xs, ys = zip(*pts, strict=True)
            style = {"marker": "o", "ls": "-"} if key.startswith("ocbank") else {"marker": "s", "ls": ":"}
            ax.plot(xs, ys, label=key, **style)
        ax.set_xscale("log")
        ax.set_xlabel("bank MB (log)")
        ax.set_ylabel("image AUROC")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("ocbank lines: one point per radius; every method on identical features")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory_growth(growth: dict[str, list[float]], name: str, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(growth["images"], np.array(growth["full_bytes"]) / 1e6, label="PatchCore full bank")
    ax.plot(growth["images"], np.array(growth["ocbank_bytes"]) / 1e6, label="ocbank")
    ax.set_xlabel(f"training images streamed ({name})")
    ax.set_ylabel("bank MB")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_radii(text: str | None, cfg: config.Config) -> list[Any]:
    """``None`` -> the config's radius; else comma-separated numbers and/or 'auto'."""
    if not text:
        return [cfg.bank.radius]
    radii: list[Any] = []
    for token in (t.strip() for t in text.split(",")):
        if token == "auto":
            radii.append("auto")
            continue
        try:
            value = float(token)
        except ValueError:
            value = -1.0
        if not value > 0:
            msg = f"--radii takes 'auto' and/or positive numbers separated by commas, got {token!r}."
            raise SystemExit(msg)
        radii.append(value)
    return radii


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", help="comma-separated subset")
    ap.add_argument("--radii", help="comma-separated radii and/or 'auto' (default: the config's bank.radius)")
    ap.add_argument("--smoke", action="store_true", help="one class, few images: about a minute on 2 CPU cores")
    ap.add_argument("--make-data", action="store_true", help="generate the synthetic demo data at data.root if missing")
    ap.add_argument("--device", help="override the config's device")
    ap.add_argument("--shards", type=int, default=1, help="also build ocbank in N merged shards (row ocbank_sharded)")
    ap.add_argument("--modes", default="nn,local_mean,local_gauss",
                    help="image-score modes for every 1-NN bank (ocbank.model.scoring.MODES)")
    ap.add_argument("--features", help="features cached by 'python -m benchmarks.scoring_modes cache' (the same "
                    "config's data): skips extraction, so e2e img/s is not measured")
    ap.add_argument("--exemplars", type=float, default=0.02,
                    help="also run ocbank + edge exemplars (this fraction of the training patches; 0: off)")
    ap.add_argument("--baselines", help=f"comma-separated subset of {','.join(BASELINES)} ('' for none; "
                    "default: all, and only spade with --smoke, PaDiM's 550x550 inverses per position being slow)")
    args = ap.parse_args(argv)
    if args.baselines is None:
        args.baselines = "spade" if args.smoke else ",".join(BASELINES)
    baselines = [b for b in args.baselines.split(",") if b]
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or any(m not in scoring.MODES for m in modes):
        msg = f"--modes takes names from {', '.join(scoring.MODES)}, got {args.modes!r}."
        raise SystemExit(msg)
    if unknown := [b for b in baselines if b not in BASELINES]:
        msg = f"--baselines takes names from {', '.join(BASELINES)}, got {unknown!r}."
        raise SystemExit(msg)

    overrides: dict[str, Any] = {"device": args.device} if args.device else {}
    cfg = config.load(args.config, overrides=overrides, require_root=False)
    root = Path(cfg.data.root)
    if args.make_data and not root.is_dir():
        from ocbank.synthetic import make_dataset  # noqa: PLC0415

        make_dataset(root)
    cfg = config.from_dict(cfg.to_dict(), source=cfg.source)  # now require the root
    device = resolve_device(cfg.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.classes.split(",") if args.classes else class_names(cfg)
    if args.smoke:
        names = names[:1]
    radii = parse_radii(args.radii, cfg)
    det = Detector.from_config(cfg)
    meta = {"device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
            "machine": f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs",
            "gemm_gflops": gemm_rate(device), "config": str(args.config), "smoke": args.smoke}
    rows: list[dict[str, Any]] = []
    growth = None
    cached = {c.name: c for c in load_features(Path(args.features))} if args.features else {}
    for name in names:
        cf = cached.pop(name) if name in cached else extract(det, load_split(cfg, name), args.smoke)
        rows += run_class(cf, cfg, radii, device, args.smoke, args.shards, baselines, modes, args.exemplars)
        if growth is None:
            first_radius = next(r["radius"] for r in rows if r["method"] == "ocbank")
            growth = (name, memory_growth(cf, first_radius))
        del cf
    for r in rows:
        r["gemm_gflops"] = meta["gemm_gflops"]
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    info = {**meta, "memory_growth_class": growth[0], "memory_growth": growth[1]}
    (out / "run_info.json").write_text(json.dumps(info, indent=2))
    write_markdown(rows, meta, out / "results.md")
    plot_r_sweep(rows, out / "r_sweep.png")
    plot_memory_growth(growth[1], growth[0], out / "memory_growth.png")
    print((out / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
