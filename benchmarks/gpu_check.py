"""Everything the GPU must show, in one process and one time budget.

python -m benchmarks.gpu_check --out DIR [--budget 420] [--device cuda] [--smoke]

Parts, each time-boxed (the budget left is shared among the parts still to run; a part
checks its box between steps, and skips what is left with a note):

- ``tests``: CPU against device equality: ``add`` (counts equal, means within 1e-5 of
  their scale), ``search``, the cap, m2, checkpoints written on one device and loaded on
  the other, and ``Detector.fit``/``predict`` (maps within 1e-3 of their range);
- ``bank``: the bank alone at K ~ 20k, vectors/s and its ratio to the device's own fp32
  GEMM rate measured in the same run;
- ``e2e_224`` (batch 32; fp32, fp16, bf16 autocast) and ``e2e_512``: img/s of the backbone
  plus 1-NN search, and of ``Detector.predict``, with peak device memory;
- ``search_140k``: one bank of 140k centroids, exact and fp16/bf16 search: recall@1, time;
- ``jpeg``: ``torchvision.io.decode_jpeg(device=...)`` against ocbank's CPU loader.

It needs torch, torchvision, numpy, scipy, h5py, numba, scikit-learn and a faiss
(faiss-cpu is enough: a CUDA bank then searches with torch). ``--smoke`` runs the same
code on the CPU at tiny sizes, in seconds (CI runs it). Writes DIR/gpu_check.json (strict
JSON: every figure next to its target with ``met`` true/false/null) and prints a table last.
Exit status: 0 when a part ran, no check failed and no part raised; 1 otherwise; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ocbank import ClusterBank
from ocbank.engine.checkpoint import BankState
from ocbank.engine.store import TorchStore
from ocbank.jsonio import write_json

from .common import PeakMemory, gemm_gflops, gemm_rate, machine_info

# Target figures for an H100/H200 (recorded next to each measured figure; null in --smoke).
TARGETS = {
    "bank_vectors_per_s": 500_000,
    "e2e_224_img_per_s": 1_000,
    "bank_peak_device_bytes": 200_000_000,
    "half_search_recall_at_1": 0.999,
}
MEANS_TOL = 1e-5  # CPU vs device means, relative to the largest |mean|
MAPS_TOL = 1e-3  # CPU vs device anomaly maps, relative to the maps' range


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of a full run and of ``--smoke``."""

    add_n: int
    add_dim: int
    bank_k: int
    bank_batches: int
    e2e_images: int
    e2e_side: tuple[int, int]  # the two image sides (224, 512)
    search_k: int
    search_queries: int
    search_dim: int
    jpeg_images: int
    detector_side: int
    detector_images: int


FULL = Sizes(20_000, 64, 20_000, 60, 256, (224, 512), 140_000, 32 * 784, 1536, 512, 224, 12)
SMOKE = Sizes(800, 16, 300, 2, 4, (64, 96), 2_000, 300, 64, 6, 64, 4)


@dataclass
class Part:
    """One part of the check: its figures, its checks (name -> passed) and notes."""

    name: str
    status: str = "not run"  # ran | partial | skipped | error
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "seconds": round(self.seconds, 3), "figures": self.figures,
                "checks": self.checks, "notes": self.notes}


@dataclass
class Context:
    device: str
    smoke: bool
    sizes: Sizes
    work: Path
    deadline: float = 0.0  # the current part's time box, perf_counter seconds
    extractors: dict[tuple[str, str], Any] = field(default_factory=dict)  # (device, autocast) -> one backbone

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def target(self, key: str, value: float | None, higher_is_better: bool = True) -> dict[str, Any]:
        """A figure next to its target; ``met`` is null in --smoke and when nothing was measured."""
        goal = TARGETS[key]
        met = None
        if value is not None and not self.smoke:
            met = bool(value >= goal) if higher_is_better else bool(value <= goal)
        return {"value": value, "target": goal, "met": met}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _clustered(n: int, dim: int, n_clusters: int, spread: float, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)) * spread
    return (centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, dim)) * noise).astype(np.float32)


def _rel_means(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b| (0 for two empty banks)."""
    if not b.size:
        return 0.0
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(float(np.abs(b).max()), 1e-30))


def _device_bank(ctx: Context, dim: int, radius: float, precision: str = "fp32", **kw: Any) -> ClusterBank:
    """A bank on the check's device; on the CPU (--smoke) the torch store, i.e. the code path CUDA runs."""
    search = "torch" if ctx.device == "cpu" else "auto"
    return ClusterBank(dim, radius, device=ctx.device, gpu_search=search, gpu_search_precision=precision, **kw)


def _feed(bank: ClusterBank, X: np.ndarray, device: str, batch: int = 784) -> ClusterBank:
    for lo in range(0, len(X), batch):
        bank.add(torch.from_numpy(X[lo : lo + batch]).to(device))
    return bank


# ---------------------------------------------------------------------- parts
def part_tests(ctx: Context, part: Part) -> None:
    """CPU (faiss store) against the device store on the same streams."""
    s = ctx.sizes
    X = _clustered(s.add_n, s.add_dim, 300, 3.0, 0.8, 0)
    q = _clustered(2000 if not ctx.smoke else 200, s.add_dim, 300, 3.0, 0.8, 1)
    cpu = _feed(ClusterBank(s.add_dim, 6.0), X, "cpu")
    for precision in ("fp32", "fp16", "bf16"):
        if ctx.left() <= 0:
            part.notes.append(f"add/search {precision}: not run, time box spent")
            continue
        dev = _feed(_device_bank(ctx, s.add_dim, 6.0, precision), X, ctx.device)
        part.figures[f"add_{precision}_backend"] = dev.search_backend
        rel = _rel_means(dev.means, cpu.means) if len(dev) == len(cpu) else None
        part.figures[f"add_{precision}_means_rel_diff"] = rel
        part.checks[f"add_{precision}"] = bool(np.array_equal(dev.counts, cpu.counts) and rel is not None and rel <= MEANS_TOL)
        d_cpu, i_cpu = cpu.search(q)
        d_dev, i_dev = dev.search(torch.from_numpy(q).to(ctx.device))
        agree = float((i_cpu == i_dev).mean())
        part.figures[f"search_{precision}_id_agreement"] = agree
        part.checks[f"search_{precision}"] = bool(agree >= 0.999 and np.allclose(d_dev, d_cpu, rtol=1e-3, atol=1e-3))
    if ctx.left() > 0:
        Xc = _clustered(5000 if not ctx.smoke else 600, 32, 200, 3.0, 0.5, 3)
        cpu_c = _feed(ClusterBank(32, 0.5, max_centroids=60), Xc, "cpu")
        dev_c = _feed(_device_bank(ctx, 32, 0.5, max_centroids=60), Xc, ctx.device)
        part.checks["cap"] = bool(
            np.array_equal(dev_c.counts, cpu_c.counts) and len(dev_c) <= 60
            and dev_c.radius_history_ == cpu_c.radius_history_
        )
        scale = 1e-6 * cpu_c.counts * float((Xc.astype(np.float64) ** 2).sum(1).mean())
        part.checks["m2"] = bool(len(dev_c) == len(cpu_c) and (np.abs(dev_c.m2 - cpu_c.m2) <= scale).all())
    else:
        part.notes.append("cap, m2: not run, time box spent")
    if ctx.left() > 0:
        part.checks["checkpoint_device_to_cpu"], part.checks["checkpoint_cpu_to_device"] = _checkpoints(ctx)
    else:
        part.notes.append("checkpoints: not run, time box spent")
    if ctx.left() > 0:
        _detector_equality(ctx, part)
    else:
        part.notes.append("detector: not run, time box spent")


def _checkpoints(ctx: Context) -> tuple[bool, bool]:
    X = _clustered(3000 if not ctx.smoke else 400, 32, 40, 3.0, 0.5, 2)
    half = len(X) // 2
    path = ctx.work / "dev.h5"
    _feed(_device_bank(ctx, 32, 3.0), X[:half], ctx.device).save(path)
    loaded = ClusterBank.load(path, device="cpu").add(X[half:])
    whole = ClusterBank(32, 3.0).add(X)
    to_cpu = bool(np.array_equal(loaded.counts, whole.counts) and _rel_means(loaded.means, whole.means) <= MEANS_TOL)
    ClusterBank(32, 3.0).add(X[:half]).save(ctx.work / "cpu.h5")
    search = "torch" if ctx.device == "cpu" else "auto"
    on_dev = _feed(ClusterBank.load(ctx.work / "cpu.h5", device=ctx.device, gpu_search=search), X[half:], ctx.device)
    to_dev = bool(np.array_equal(on_dev.counts, whole.counts) and _rel_means(on_dev.means, whole.means) <= MEANS_TOL)
    return to_cpu, to_dev


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """fp32 convolutions and matmuls really in fp32 (TF32 would move features by ~1e-3)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _detector(ctx: Context, side: int, device: str, autocast: str = "none", batch: int = 32, radius: Any = "auto",
              **bank: Any) -> Any:
    """A Detector (random backbone weights: the speed is the same) sharing one backbone per device and autocast."""
    from ocbank.config import from_dict  # noqa: PLC0415
    from ocbank.model.detector import Detector  # noqa: PLC0415
    from ocbank.model.features import FeatureExtractor  # noqa: PLC0415

    data = {"resize": 256, "crop": 224} if side == 224 else {"resize": side, "crop": None}
    cfg = {"data": {**data, "batch_size": batch}, "backbone": {"weights": "none", "autocast": autocast},
           "bank": {"radius": radius, "radius_images": 8, **bank}, "device": device}
    key = (device, autocast)
    if key not in ctx.extractors:
        ctx.extractors[key] = FeatureExtractor(weights="none", device=device, autocast=autocast)
    return Detector.from_config(from_dict(cfg, require_root=False), extractor=ctx.extractors[key])


def _images(ctx: Context, side: int, n: int) -> torch.Tensor:
    """n synthetic texture images [n, 3, side, side] in [0, 1] (ocbank.synthetic), built once per size."""
    from ocbank.synthetic import TEXTURES  # noqa: PLC0415

    rng = np.random.default_rng(side)
    names = sorted(TEXTURES)
    out = np.stack([np.clip(TEXTURES[names[i % len(names)]](rng, side), 0, 1) for i in range(n)])
    return torch.from_numpy(out.astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def _detector_equality(ctx: Context, part: Part) -> None:
    side = ctx.sizes.detector_side
    imgs = _images(ctx, side, ctx.sizes.detector_images)
    train, test = imgs[:-2], imgs[-2:]
    with _no_tf32():
        cpu = _detector(ctx, side, "cpu", batch=4)
        cpu.fit(train)
        extra = {"gpu_search": "torch"} if ctx.device == "cpu" else {}
        dev = _detector(ctx, side, ctx.device, batch=4, radius=cpu.bank.radius_, **extra)
        dev.fit(train)
        a, b = cpu.predict(test), dev.predict(test)
    span = float(a.maps.max() - a.maps.min())
    diff = float(np.abs(a.maps - b.maps).max()) / max(span, 1e-30)
    part.figures["detector_maps_diff_over_range"] = diff
    part.figures["detector_centroids_cpu_device"] = [len(cpu.bank), len(dev.bank)]
    part.checks["detector_fit_predict"] = bool(diff <= MAPS_TOL)


def _add_rate(ctx: Context, part: Part, label: str, bank: ClusterBank, batches: list[np.ndarray], n_batches: int,
              device: str) -> float:
    """Vectors/s of ``bank.add`` over ``n_batches`` of ``batches`` (cycled) after one warm-up batch."""
    rows = [torch.from_numpy(b).to(device) if device != "cpu" or isinstance(bank.store_, TorchStore) else b
            for b in batches]
    bank.add(rows[0])  # warm-up (numba compiles on the first call of the process)
    sync(device)
    n, start = 0, time.perf_counter()
    for i in range(n_batches):
        bank.add(rows[i % len(rows)])
        n += len(rows[i % len(rows)])
        if ctx.left() <= 0 and i + 1 < n_batches:
            part.notes.append(f"{label}: stopped after {i + 1} of {n_batches} batches, time box spent")
            break
    sync(device)
    return n / (time.perf_counter() - start)


def part_bank(ctx: Context, part: Part) -> None:
    """The bank alone at K centroids of 1536-d: vectors/s of add, against the device's fp32 GEMM rate.

    The same batches also go through the faiss CPU store in the same run (the ratio is
    device bank / CPU store; on the CPU it compares the torch search with faiss).
    """
    s = ctx.sizes
    dim = 1536
    gflops = gemm_gflops(512) if ctx.smoke else gemm_rate(ctx.device)
    part.figures["device_fp32_gemm_gflops"] = gflops
    rng = np.random.default_rng(5)
    centers = (rng.standard_normal((s.bank_k, dim)) * 2.0).astype(np.float32)
    state = BankState(centers, np.ones(s.bank_k, np.int64), 26.0, dim, s.bank_k, m2=np.zeros(s.bank_k))
    # Patches near known centroids (absorbed, as most patches are once a bank has grown).
    batches = [centers[rng.integers(0, s.bank_k, 784)] + rng.standard_normal((784, dim), dtype=np.float32) * 0.45
               for _ in range(4)]
    rates = {}
    for precision in ("fp32", "bf16", "faiss_cpu_store"):
        if ctx.left() <= 0:
            part.notes.append(f"{precision}: not run, time box spent")
            continue
        on_cpu = precision == "faiss_cpu_store"
        device = "cpu" if on_cpu else ctx.device
        with PeakMemory(device) as peak:
            bank = (ClusterBank(dim, 26.0) if on_cpu else _device_bank(ctx, dim, 26.0, precision)).load_state(state)
            n_batches = min(s.bank_batches, 8) if on_cpu else s.bank_batches
            rate = rates[precision] = _add_rate(ctx, part, precision, bank, batches, n_batches, device)
        part.figures[f"{precision}_vectors_per_s"] = ctx.target("bank_vectors_per_s", rate) if precision == "fp32" else rate
        part.figures[f"{precision}_k"] = len(bank)
        # The add's GEMM work: 2 K dim flops per vector; its share of the device's fp32 GEMM rate.
        part.figures[f"{precision}_share_of_fp32_gemm"] = rate * 2.0 * len(bank) * dim / (gflops * 1e9)
        if not on_cpu:
            mem = peak.to_dict()
            part.figures[f"{precision}_peak_device_memory"] = mem
            if precision == "fp32":
                part.figures["bank_peak_device_bytes"] = ctx.target(
                    "bank_peak_device_bytes", mem["torch_max_allocated_bytes"], higher_is_better=False)
    for precision in ("fp32", "bf16"):
        if precision in rates and "faiss_cpu_store" in rates:
            part.figures[f"{precision}_over_faiss_cpu_store"] = rates[precision] / rates["faiss_cpu_store"]


def _e2e(ctx: Context, part: Part, side: int, precisions: tuple[str, ...], n_images: int) -> None:
    """Fit and score ``n_images`` synthetic images at side² in each autocast precision: img/s and peak memory."""
    from ocbank.data.images import normalize  # noqa: PLC0415

    imgs = _images(ctx, side, n_images)
    if ctx.device.startswith("cuda"):
        imgs = imgs.pin_memory()
    radius = None
    for precision in precisions:
        autocast = {"fp32": "none", "fp16": "fp16", "bf16": "bf16"}[precision]
        if autocast != "none" and not ctx.device.startswith("cuda"):
            part.notes.append(f"{precision}: skipped, autocast needs CUDA")
            continue
        if ctx.left() <= 0:
            part.notes.append(f"{precision}: not run, time box spent")
            continue
        det = _detector(ctx, side, ctx.device, autocast, 32, radius if radius is not None else "auto")
        with PeakMemory(ctx.device) as build_mem:
            t = time.perf_counter()
            det.fit(imgs)
            sync(ctx.device)
            fit_s = time.perf_counter() - t
        radius = det.bank.radius_
        with PeakMemory(ctx.device) as score_mem:
            warm = det.extractor(normalize(imgs[:32].to(ctx.device)))  # warm-up: kernels for this batch shape
            det.bank.search(warm.reshape(-1, warm.shape[-1]))
            sync(ctx.device)
            t = time.perf_counter()
            n_feat = 0
            for lo in range(0, len(imgs), 32):  # backbone + 1-NN search only
                pixels = normalize(imgs[lo : lo + 32].to(ctx.device, non_blocking=True))
                feats = det.extractor(pixels)
                det.bank.search(feats.reshape(-1, feats.shape[-1]))
                n_feat += len(pixels)
            sync(ctx.device)
            feat_s = time.perf_counter() - t
            t = time.perf_counter()
            det.predict(imgs)
            predict_s = time.perf_counter() - t
        key = f"{precision}"
        fps = n_feat / feat_s
        part.figures[f"{key}_features_search_img_per_s"] = ctx.target("e2e_224_img_per_s", fps) if side == 224 else fps
        part.figures[f"{key}_predict_img_per_s"] = len(imgs) / predict_s
        part.figures[f"{key}_fit_img_per_s"] = len(imgs) / fit_s
        part.figures[f"{key}_centroids"] = len(det.bank)
        part.figures[f"{key}_build_peak_device_memory"] = build_mem.to_dict()
        part.figures[f"{key}_score_peak_device_memory"] = score_mem.to_dict()


def part_e2e_224(ctx: Context, part: Part) -> None:
    _e2e(ctx, part, ctx.sizes.e2e_side[0], ("fp32", "fp16", "bf16"), ctx.sizes.e2e_images)


def part_e2e_512(ctx: Context, part: Part) -> None:
    _e2e(ctx, part, ctx.sizes.e2e_side[1], ("fp32", "bf16"), max(ctx.sizes.e2e_images // 2, 2))


def part_search(ctx: Context, part: Part) -> None:
    """One bank of K centroids: exact (fp32) and half-precision search, recall@1 against exact, time."""
    s = ctx.sizes
    rng = np.random.default_rng(7)
    centers = (rng.standard_normal((s.search_k, s.search_dim)) * 2.0).astype(np.float32)
    state = BankState(centers, np.ones(s.search_k, np.int64), 1.0, s.search_dim, s.search_k, m2=np.zeros(s.search_k))
    pick = rng.integers(0, s.search_k, s.search_queries)
    queries = centers[pick] + rng.standard_normal((s.search_queries, s.search_dim), dtype=np.float32) * 0.45
    q = torch.from_numpy(queries).to(ctx.device)
    exact = None
    for precision in ("fp32", "fp16", "bf16"):
        if ctx.left() <= 0:
            part.notes.append(f"{precision}: not run, time box spent")
            continue
        bank = _device_bank(ctx, s.search_dim, 1.0, precision).load_state(state)
        bank.search(q[:64])  # warm-up
        with PeakMemory(ctx.device) as peak:
            t = time.perf_counter()
            _, ids = bank.search(q)
            seconds = time.perf_counter() - t
        part.figures[f"{precision}_seconds"] = seconds
        part.figures[f"{precision}_queries_per_s"] = len(queries) / seconds
        part.figures[f"{precision}_peak_device_memory"] = peak.to_dict()
        if precision == "fp32":
            exact = ids[:, 0]
            part.checks["exact_search_finds_the_source_centroid"] = bool((exact == pick).mean() >= 0.999)
        elif exact is not None:
            recall = float((ids[:, 0] == exact).mean())
            part.figures[f"{precision}_recall_at_1"] = ctx.target("half_search_recall_at_1", recall)
    part.figures["n_centroids"] = s.search_k
    part.figures["n_queries"] = s.search_queries


def part_jpeg(ctx: Context, part: Part) -> None:
    """JPEG decoding with torchvision on the device against ocbank's CPU loader, img/s."""
    from PIL import Image  # noqa: PLC0415

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        import torchvision.io as tvio  # noqa: PLC0415

        tvio.decode_jpeg  # noqa: B018  (torchvision >= 0.29 warns that its decoders move to TorchCodec)
    for w in caught:
        part.notes.append(f"torchvision: {str(w.message).split('.')[0]}")

    from ocbank.config import from_dict  # noqa: PLC0415
    from ocbank.data import make_loader  # noqa: PLC0415

    side = 256 if not ctx.smoke else 72
    imgs = (_images(ctx, side, ctx.sizes.jpeg_images).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    folder = ctx.work / "jpeg"
    folder.mkdir(exist_ok=True)
    paths = []
    for i, img in enumerate(imgs):
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(str(path))
    data = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths]
    decode_device = ctx.device if ctx.device.startswith("cuda") else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tvio.decode_jpeg(data[:2], device=decode_device)  # warm-up (nvjpeg handle)
        sync(ctx.device)
        t = time.perf_counter()
        for lo in range(0, len(data), 32):
            out = tvio.decode_jpeg(data[lo : lo + 32], device=decode_device)
            batch = torch.stack(out).float().div_(255)  # decoded, as float, with the 224 center crop
            crop = (side - 224) // 2 if side > 224 else 0
            batch[:, :, crop : side - crop, crop : side - crop].contiguous()
        sync(ctx.device)
    part.figures["torchvision_decode_jpeg_img_per_s"] = len(data) / (time.perf_counter() - t)
    part.figures["torchvision_decode_device"] = decode_device
    if ctx.left() <= 0:
        part.notes.append("cpu loader: not run, time box spent")
        return
    cfg = from_dict({"data": {"resize": side, "crop": 224 if side > 224 else None, "batch_size": 32,
                              "num_workers": 0}, "device": "cpu"}, require_root=False)
    from ocbank.data.datasets import Sample  # noqa: PLC0415

    t = time.perf_counter()
    n = sum(len(b.index) for b in make_loader([Sample(p) for p in paths], cfg))
    part.figures["cpu_loader_img_per_s"] = n / (time.perf_counter() - t)
    part.figures["image_side"] = side


PARTS: list[tuple[str, Callable[[Context, Part], None], float]] = [
    ("tests", part_tests, 0.3),
    ("bank", part_bank, 0.12),
    ("e2e_224", part_e2e_224, 0.2),
    ("e2e_512", part_e2e_512, 0.12),
    ("search_140k", part_search, 0.16),
    ("jpeg", part_jpeg, 0.1),
]


def run(ctx: Context, budget: float, only: set[str] | None = None) -> dict[str, Part]:
    """Run the parts in order, each in its share of the budget left."""
    end = time.perf_counter() + budget
    results: dict[str, Part] = {}
    todo = [(n, f, w) for n, f, w in PARTS if only is None or n in only]
    for i, (name, fn, weight) in enumerate(todo):
        part = results[name] = Part(name)
        left = end - time.perf_counter()
        if left <= 0:
            part.status = "skipped"
            part.notes.append(f"skipped: the {budget:.0f} s budget was spent")
            continue
        share = weight / sum(w for _, _, w in todo[i:])
        ctx.deadline = time.perf_counter() + left * share
        start = time.perf_counter()
        try:
            fn(ctx, part)
            part.status = "partial" if any("not run" in n or "stopped" in n for n in part.notes) else "ran"
        except Exception as exc:  # noqa: BLE001  (one part's failure must not lose the others)
            part.status = "error"
            part.notes.append(f"{type(exc).__name__}: {exc}")
            part.notes.append(traceback.format_exc(limit=3))
        part.seconds = time.perf_counter() - start
        print(f"[gpu_check] {name}: {part.status} in {part.seconds:.1f} s", file=sys.stderr, flush=True)
    return results


def _cell(value: Any) -> str:
    if isinstance(value, dict) and "value" in value:
        met = {True: " (met)", False: " (missed)", None: ""}[value["met"]]
        return _cell(value["value"]) + met
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items() if k != "note")
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def table(results: dict[str, Part]) -> str:
    out = io.StringIO()
    out.write(f"{'part':<12} {'status':<8} {'figure / check':<44} value\n")
    for name, part in results.items():
        out.write(f"{name:<12} {part.status:<8} {'(seconds)':<44} {part.seconds:.1f}\n")
        for key, passed in part.checks.items():
            out.write(f"{'':<21} {key:<44} {'PASS' if passed else 'FAIL'}\n")
        for key, value in part.figures.items():
            out.write(f"{'':<21} {key:<44} {_cell(value)}\n")
        for note in part.notes:
            out.write(f"{'':<21} note: {note.splitlines()[0] if note else note}\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all parts together (default 420)")
    p.add_argument("--device", default=None, help="cuda, cuda:N (default: cuda; cpu with --smoke)")
    p.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes (seconds)")
    p.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(n for n, _, _ in PARTS)}")
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: --device {device} was asked for, but torch sees no CUDA GPU. Run with --smoke on a CPU.",
              file=sys.stderr)
        return 2
    if not args.budget > 0:
        print(f"gpu_check: --budget must be > 0 seconds, got {args.budget}.", file=sys.stderr)
        return 2
    only = None if args.parts is None else set(args.parts.split(","))
    unknown = (only or set()) - {n for n, _, _ in PARTS}
    if unknown:
        print(f"gpu_check: unknown part(s) {sorted(unknown)}; known: {[n for n, _, _ in PARTS]}.", file=sys.stderr)
        return 2
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(device, args.smoke, SMOKE if args.smoke else FULL, Path(work))
        results = run(ctx, args.budget, only)
    checks = [ok for part in results.values() for ok in part.checks.values()]
    errors = [n for n, part in results.items() if part.status == "error"]
    ran = [n for n, part in results.items() if part.status in ("ran", "partial")]
    passed = None if not checks else all(checks)  # None: no check ran (a subset of parts, or a spent budget)
    report = {
        "machine": machine_info(device),
        "device": device,
        "smoke": args.smoke,
        "budget_s": args.budget,
        "sizes": dataclasses.asdict(SMOKE if args.smoke else FULL),
        "targets": TARGETS,
        "all_checks_passed": passed,
        "parts_with_errors": errors,
        "parts": {name: part.to_dict() for name, part in results.items()},
    }
    path = write_json(out / "gpu_check.json", report)
    print(table(results))
    print(f"wrote {path}; checks passed: {passed}; parts with errors: {errors or 'none'}")
    return 0 if ran and passed is not False and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
