"""Scoring modes for the cluster bank, compared on identical cached features.

python -m benchmarks.scoring_modes cache --config CFG --root DATA --out FEATS.npz
python -m benchmarks.scoring_modes sweep --features A.npz[,B.npz] --out DIR [--radii 18,22,auto]

``cache`` extracts a dataset's features once (every class) into one .npz file;
``sweep`` builds the cluster bank (with counts and the Welford second moment
per centroid) at each radius and scores the test set with every mode of
:data:`MODES`, next to the full bank, writing DIR/modes.json and DIR/modes.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ocbank import ClusterBank, config
from ocbank.engine._faiss import faiss

from .common import ClassFeatures, extract, load_features


def cache(config_path: str, root: str, out: Path) -> None:
    """Extract every class's train/test features of ``root`` and save them to ``out`` (.npz)."""
    from ocbank.data import class_names, load_split  # noqa: PLC0415
    from ocbank.model.detector import Detector  # noqa: PLC0415

    cfg = config.load(config_path, overrides={"data": {"root": root}})
    det = Detector.from_config(cfg)
    arrays: dict[str, np.ndarray] = {}
    for name in class_names(cfg):
        t = time.perf_counter()
        cf = extract(det, load_split(cfg, name), smoke=False)
        for key in ("train", "test", "labels", "masks"):
            arrays[f"{name}/{key}"] = getattr(cf, key)
        print(f"{name}: {cf.train.shape} train, {cf.test.shape} test, {time.perf_counter() - t:.0f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)


load_cached = load_features


@dataclass
class BankState:
    """A cluster bank with what the scoring modes may need: [K, C] means, [K] counts, [K] m2."""

    means: np.ndarray
    counts: np.ndarray
    m2: np.ndarray
    radius: float
    assign: np.ndarray  # [n_train_patches] nearest final centroid of each training patch

    @property
    def spread(self) -> np.ndarray:
        """[K] RMS distance of the members from their centroid."""
        return np.sqrt(self.m2 / np.maximum(self.counts, 1))


def build_bank(train: np.ndarray, radius: float) -> BankState:
    """Stream train [n, h, w, C] into ClusterBank image by image; m2 is computed post hoc.

    Post hoc: each training patch is assigned to its nearest final centroid and
    m2 = sum of squared distances (the engine's streaming Welford m2 differs
    only by the drift of the mean while members arrive).
    """
    n, h, w, c = train.shape
    bank = ClusterBank(c, radius)
    for img in train:
        bank.add(img.reshape(-1, c))
    means = np.ascontiguousarray(bank.means, dtype=np.float32)
    sq, ids = faiss.knn(np.ascontiguousarray(train.reshape(-1, c)), means, 1)
    m2 = np.bincount(ids[:, 0], weights=np.maximum(sq[:, 0], 0).astype(np.float64), minlength=len(means))
    return BankState(means, np.asarray(bank.counts, dtype=np.int64), m2, float(radius), ids[:, 0])


def knn(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, C] against [K, C] -> plain L2 distances [n, k] (ascending) and ids [n, k]."""
    sq, ids = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), np.ascontiguousarray(vectors), k)
    return np.sqrt(np.maximum(sq, 0.0)), ids


# ---------------------------------------------------------------------- modes
KN = 10  # nearest centroids fetched per test patch (enough for every mode below)


@dataclass
class Query:
    """One class's test set searched against one bank: dists/ids [N, KN] for N = n*h*w patches."""

    dists: np.ndarray
    ids: np.ndarray
    bank: BankState
    shape: tuple[int, int, int]  # (n, h, w)


def eff_dim(train: np.ndarray, bank: BankState, sample: int = 4000, seed: int = 0) -> float:
    """Participation ratio (tr S)^2 / tr(S^2) of the residuals x - mu(x): the clusters' effective dimension."""
    flat = train.reshape(-1, train.shape[-1])
    rng = np.random.default_rng(seed)
    x = flat[rng.choice(len(flat), size=min(sample, len(flat)), replace=False)]
    _, ids = knn(x, bank.means, 1)
    res = (x - bank.means[ids[:, 0]]).astype(np.float64)
    gram = res.T @ res / len(res)
    return float(np.trace(gram) ** 2 / np.sum(gram * gram))


def patch_modes(q: Query, d_eff: float) -> dict[str, np.ndarray]:
    """Every patch-level mode on the same search result: name -> [N] patch scores."""
    d, ids, b = q.dists, q.ids, q.bank
    d0, i0 = d[:, 0], ids[:, 0]
    spread, counts = b.spread[i0], b.counts[i0].astype(np.float64)
    med = float(np.median(b.spread[b.counts > 1])) if np.any(b.counts > 1) else 0.0
    sigma = spread / np.sqrt(d_eff)
    nn_est = d0**2 + spread**2 - 2.0 * d0 * sigma * np.sqrt(2.0 * np.log(np.maximum(counts, 1.0)))
    # count-as-density kNN: PatchCore-like soft minimum where each centroid stands for n copies
    logits = -(d**2) / (2.0 * max(med, 1e-6) ** 2) + np.log(b.counts[ids].astype(np.float64))
    soft = -np.logaddexp.reduce(logits, axis=1)  # larger = rarer
    return {
        "nn": d0,
        "minus_spread": d0 - spread,
        "minus_half_spread": d0 - 0.5 * spread,
        "rms_member": np.sqrt(d0**2 + spread**2),
        "nn_member_est": np.sqrt(np.maximum(nn_est, 0.0)),
        "over_spread_median": d0 / (spread + med),
        "singleton_penalty": d0 + np.where(counts <= 1, 0.1 * b.radius_, 0.0),
        "count_penalty": d0 + b.radius_ / np.sqrt(counts) * 0.25,
        "knn3_mean": d[:, :3].mean(axis=1),
        "density_nll": soft,
    }


def aggregate(grid: np.ndarray, how: str) -> np.ndarray:
    """[n, h, w] patch scores -> [n] image scores."""
    from scipy.ndimage import uniform_filter  # noqa: PLC0415

    if how == "max":
        return grid.reshape(len(grid), -1).max(axis=1)
    if how == "local3":  # mean over each 3x3 grid neighbourhood, then the max
        return uniform_filter(grid, size=(1, 3, 3), mode="nearest").reshape(len(grid), -1).max(axis=1)
    if how == "local5":
        return uniform_filter(grid, size=(1, 5, 5), mode="nearest").reshape(len(grid), -1).max(axis=1)
    if how == "gauss1":  # Gaussian blur of the grid, sigma = 1 patch, then the max
        from scipy.ndimage import gaussian_filter  # noqa: PLC0415

        return gaussian_filter(grid, sigma=(0, 1, 1), mode="nearest").reshape(len(grid), -1).max(axis=1)
    if how == "top10":
        flat = np.sort(grid.reshape(len(grid), -1), axis=1)
        return flat[:, -10:].mean(axis=1)
    msg = f"unknown aggregation {how!r}. Use one of {AGGREGATIONS}."
    raise ValueError(msg)


AGGREGATIONS = ("max", "local3", "local5", "gauss1", "top10")


# ---------------------------------------------------------------------- sweep
def bank_bytes(k: int, dim: int, extra_per_centroid: int = 0) -> int:
    """Bytes of K float32 means + int64 counts (+ e.g. 8 for a float64 m2)."""
    return k * (4 * dim + 8 + extra_per_centroid)


def grid_rows(name: str, grid: np.ndarray, cf: ClassFeatures, base: dict[str, Any],
              pixel: bool) -> list[dict[str, Any]]:
    """One row per aggregation for a [n, h, w] patch-score grid."""
    from ocbank.model import metrics  # noqa: PLC0415
    from ocbank.model.scoring import anomaly_maps  # noqa: PLC0415

    rows = []
    pix = metrics.pixel_auroc(cf.masks, anomaly_maps(grid, cf.masks.shape[-1], 4.0)) if pixel else float("nan")
    for how in AGGREGATIONS:
        auroc = metrics.image_auroc(cf.labels, aggregate(grid, how))
        rows.append({**base, "mode": name, "agg": how, "image_auroc": auroc, "pixel_auroc": pix})
    return rows


def sweep_class(cf: ClassFeatures, radii: list[float], cache_dir: Path, tag: str,
                flush: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
                quick: bool = False) -> list[dict[str, Any]]:
    """All modes at every radius for one class; ``flush`` gets the rows so far after each radius.

    ``quick`` skips the modes that build or search a second large set (exemplars_2to4, refine_*).
    """
    n, h, w, c = cf.test.shape
    flat_train = np.ascontiguousarray(cf.train.reshape(-1, c))
    queries = np.ascontiguousarray(cf.test.reshape(-1, c))
    shape = (n, h, w)
    full_path = cache_dir / f"{tag}_{cf.name}_full.npy"
    if full_path.is_file():
        full = np.load(full_path)
    else:
        full = knn(queries, flat_train, 1)[0][:, 0]
        np.save(full_path, full)
    common = {"dataset": tag, "class": cf.name}
    rows = grid_rows("full", full.reshape(shape), cf, {**common, "radius": None, "bank_vectors": len(flat_train),
                     "bank_bytes": len(flat_train) * 4 * c}, pixel=True)
    nn_grids: dict[float, np.ndarray] = {}
    for r in radii:
        t = time.perf_counter()
        bank = build_bank(cf.train, r)
        k = len(bank.means)
        d, ids = knn(queries, bank.means, min(KN, k))
        q = Query(d, ids, bank, shape)
        d_eff = eff_dim(cf.train, bank)
        base = {**common, "radius": r, "bank_vectors": k, "d_eff": d_eff}
        for name, scores in patch_modes(q, d_eff).items():
            extra = 0 if name in ("nn", "knn3_mean", "density_nll", "singleton_penalty", "count_penalty") else 8
            rows += grid_rows(name, scores.reshape(shape), cf, {**base, "bank_bytes": bank_bytes(k, c, extra)},
                              pixel=name in ("nn", "rms_member", "nn_member_est"))
        nn_grids[r] = d[:, 0]
        # exemplars: raw members of centroids with 2..4 members, searched next to the centroids
        small = (bank.counts >= 2) & (bank.counts <= 4)
        members = flat_train[small[bank.assign]]
        if len(members) and not quick:
            ex = np.minimum(d[:, 0], knn(queries, members, 1)[0][:, 0])
            rows += grid_rows("exemplars_2to4", ex.reshape(shape), cf,
                              {**base, "bank_bytes": bank_bytes(k, c) + members.nbytes,
                               "extra_vectors": len(members)}, pixel=False)
        # edge exemplars: the training patches farthest from their own centroid (top 5% / 2% / 1% of
        # residuals), kept raw; a rare-but-normal test patch then finds its true neighbour
        resid = np.linalg.norm(flat_train - bank.means[bank.assign], axis=1)
        for frac in (0.05, 0.02, 0.01):
            ex_vec = flat_train[resid >= np.quantile(resid, 1.0 - frac)]
            ex = np.minimum(d[:, 0], knn(queries, ex_vec, 1)[0][:, 0])
            rows += grid_rows(f"edge_exemplars_{frac:g}", ex.reshape(shape), cf,
                              {**base, "bank_bytes": bank_bytes(k, c) + ex_vec.nbytes, "extra_vectors": len(ex_vec)},
                              pixel=frac == 0.02)
        # a finer bank (radius 0.7 r) over the members of the widest quarter / the sparse (<= 3) clusters
        for label, sel in (("refine_wide", bank.spread >= np.quantile(bank.spread[bank.counts > 1], 0.75)),
                           ("refine_sparse", bank.counts <= 3)):
            part = cf.train.reshape(-1, c)[sel[bank.assign]]
            if not len(part) or quick:
                continue
            fine = ClusterBank(c, 0.7 * r).add(part)
            dd = np.minimum(d[:, 0], knn(queries, np.asarray(fine.means), 1)[0][:, 0])
            rows += grid_rows(label, dd.reshape(shape), cf, {**base, "bank_bytes": bank_bytes(k + len(fine), c),
                                                             "extra_vectors": len(fine)}, pixel=False)
        flush(rows)
        print(f"{tag}/{cf.name} r={r}: K={k} d_eff={d_eff:.1f} {time.perf_counter() - t:.0f} s", flush=True)
    # multi-radius ensembles: mean of the plain grids of two neighbouring radii
    rs = sorted(nn_grids)
    for a, b in zip(rs, rs[1:], strict=False):
        ka = next(x["bank_vectors"] for x in rows if x["radius"] == a)
        kb = next(x["bank_vectors"] for x in rows if x["radius"] == b)
        rows += grid_rows(f"ensemble_r{b:g}", (0.5 * (nn_grids[a] + nn_grids[b])).reshape(shape), cf,
                          {**common, "radius": a, "bank_vectors": ka + kb, "bank_bytes": bank_bytes(ka + kb, c)},
                          pixel=False)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over datasets and classes per (radius, mode, agg), and its difference from the full bank (nn, max)."""
    full = {(r["dataset"], r["class"]): r["image_auroc"] for r in rows if r["mode"] == "full" and r["agg"] == "max"}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["radius"], r["mode"], r["agg"]), []).append(r)
    out = []
    for (radius, mode, agg), g in groups.items():
        deltas = [x["image_auroc"] - full[(x["dataset"], x["class"])] for x in g]
        full_bytes = [x for x in rows if x["mode"] == "full"][0]["bank_bytes"]
        out.append({"radius": radius, "mode": mode, "agg": agg, "n": len(g),
                    "image_auroc": float(np.mean([x["image_auroc"] for x in g])),
                    "minus_full": float(np.mean(deltas)), "min_minus_full": float(np.min(deltas)),
                    "wins": int(sum(x >= 0 for x in deltas)),
                    "pixel_auroc": float(np.nanmean([x["pixel_auroc"] for x in g])) if any(
                        not np.isnan(x["pixel_auroc"]) for x in g) else float("nan"),
                    "memory_fraction": float(np.mean([x["bank_bytes"] for x in g]) / full_bytes)})
    return sorted(out, key=lambda x: -x["minus_full"])


def write_summary(summary: list[dict[str, Any]], path: Path) -> None:
    lines = ["| radius | mode | image score | img AUROC | − full | worst − full | ≥ full | pix AUROC | memory / full |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        radius = "—" if s["radius"] is None else f"{s['radius']:g}"
        pix = "" if np.isnan(s["pixel_auroc"]) else f"{100 * s['pixel_auroc']:.1f}"
        lines.append(f"| {radius} | {s['mode']} | {s['agg']} | {100 * s['image_auroc']:.1f} | "
                     f"{100 * s['minus_full']:+.1f} | {100 * s['min_minus_full']:+.1f} | {s['wins']}/{s['n']} | "
                     f"{pix} | "
                     f"{100 * s['memory_fraction']:.1f}% |")
    path.write_text("\n".join(lines) + "\n")


def plot_summary(summary: list[dict[str, Any]], path: Path) -> None:
    """Mean image AUROC minus the full bank's against memory / full bank, one marker per (mode, image score)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, aggs in zip(axes, (("max",), tuple(a for a in AGGREGATIONS if a != "max")), strict=True):
        for s in summary:
            if s["agg"] not in aggs or s["mode"] in ("minus_spread", "over_spread_median", "density_nll"):
                continue
            ax.scatter(100 * s["memory_fraction"], 100 * s["minus_full"], s=14)
            radius = "" if s["radius"] is None else f" r{s['radius']:g}"
            ax.annotate(f"{s['mode']}{radius} {s['agg']}", (100 * s["memory_fraction"], 100 * s["minus_full"]),
                        fontsize=5)
        ax.axhline(0, color="k", lw=0.8)
        ax.axvline(15, color="r", lw=0.8, ls="--")
        ax.set_ylim(-6, 1)  # the modes far below are listed in modes.md
        ax.set_xscale("log")
        ax.set_xlabel("memory, % of the full bank (log)")
        ax.set_title("image score: " + ", ".join(aggs))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("img AUROC − full bank (nn, max), points")
    fig.suptitle("mean over datasets x classes; red: 15% of the full bank's bytes; below −6: see modes.md")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--config", required=True)
    c.add_argument("--root", required=True)
    c.add_argument("--out", required=True)
    sw = sub.add_parser("sweep")
    sw.add_argument("--features", required=True, help="comma-separated .npz files written by 'cache'")
    sw.add_argument("--out", required=True)
    sw.add_argument("--radii", default="22,26")
    sw.add_argument("--quick", action="store_true", help="skip exemplars_2to4 and refine_* (slow)")
    sw.add_argument("--summarize-only", action="store_true", help="re-summarize DIR/modes.json")
    args = ap.parse_args(argv)
    if args.cmd == "cache":
        cache(args.config, args.root, Path(args.out))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    radii = [float(x) for x in args.radii.split(",")]
    rows: list[dict[str, Any]] = json.loads((out / "modes.json").read_text()) if args.summarize_only else []
    for path in [] if args.summarize_only else args.features.split(","):
        tag = Path(path).stem
        for cf in load_cached(Path(path)):
            def flush(partial: list[dict[str, Any]], done: list[dict[str, Any]] = rows) -> None:
                (out / "modes.json").write_text(json.dumps(done + partial, indent=1))

            rows += sweep_class(cf, radii, Path(path).parent, tag, flush, args.quick)
            flush([])
    summary = summarize(rows)
    (out / "modes_summary.json").write_text(json.dumps(summary, indent=1))
    write_summary(summary, out / "modes.md")
    plot_summary(summary, out / "modes.png")
    print((out / "modes.md").read_text())


if __name__ == "__main__":
    main()
