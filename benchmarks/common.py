"""What the benchmark scripts share, written once: the machine description, timing, the GEMM rate,
JSON results, the benchmark data (textures, cached features, a clustered stream), flat search, a
timed streaming build, and the harness's per-class features (extracted once, or from a cache).

Each script imports from here, never from another script. Results record their machine and date
(:func:`machine_info`) because the docs quote them with both.
"""

from __future__ import annotations

import datetime
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ocbank.jsonio import dumps, write_json
from ocbank.model.features import FEATURE_DIM

if TYPE_CHECKING:
    from ocbank.model.detector import Detector

DIM = FEATURE_DIM
BATCH = 784  # one 224² image: a 28 × 28 patch grid
BENCH_CLASSES = ("weave", "dots", "grain")


# ---------------------------------------------------------------------- machine, timing, results
def machine_info(device: str = "cpu", note: str | None = None) -> dict[str, Any]:
    """The machine a result was measured on, and when (UTC).

    ``cpu_model`` and ``blas`` (each loaded BLAS: library, version, kernel architecture,
    threads) say which kernels produced a figure, so it can be compared with another
    machine's; ``doctor`` is ``ocbank doctor``'s block without its timings.
    """
    from ocbank import doctor  # noqa: PLC0415

    report = doctor.collect(measure=False)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": report["cpu"]["model"],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "blas": [{k: lib[k] for k in ("library", "version", "architecture", "threads")} for lib in report["blas"]],
        "load_avg_at_start": list(os.getloadavg()),
        "doctor": report,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if note:
        info["note"] = note
    return info


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and its wall-clock seconds."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def write_result(out_dir: str | Path, filename: str, result: dict[str, Any]) -> Path:
    """Write a benchmark's result as strict JSON under ``out_dir`` and print it (without the machine)."""
    path = write_json(Path(out_dir) / filename, result)
    print(dumps({k: v for k, v in result.items() if k != "machine"}))
    return path


def gemm_gflops(k: int, dim: int = DIM, batch: int = BATCH, repeats: int = 5) -> float:
    """fp32 GFLOP/s of numpy's ``[batch, dim] @ [dim, k]`` on this CPU: the rate a build is compared with."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((batch, dim), dtype=np.float32)
    b = rng.standard_normal((k, dim), dtype=np.float32)
    a @ b.T  # warm-up
    _, seconds = timed(lambda: [a @ b.T for _ in range(repeats)])
    return 2.0 * batch * k * dim * repeats / seconds / 1e9


def gemm_rate(device: str) -> float:
    """The device's fp32 GEMM GFLOP/s: 8192² torch matmuls on CUDA, :func:`gemm_gflops` on CPU."""
    if not device.startswith("cuda"):
        return gemm_gflops(8192)
    a = torch.randn(8192, 8192, device=device)
    for _ in range(2):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e9


# ---------------------------------------------------------------------- benchmark data
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


def make_bench_data(root: str | Path, classes: tuple[str, ...], size: int, n_train: int, n_test: int) -> Path:
    """MVTec-layout textures (ocbank.synthetic plus the benchmark-only ``grain``) at ``size``^2, cached on disk."""
    from ocbank import synthetic  # noqa: PLC0415

    synthetic.TEXTURES.setdefault("grain", _grain)  # benchmark-only family; synthetic.py is not changed
    root = Path(root)
    missing = tuple(c for c in classes if not (root / c / "train" / "good").is_dir())
    if missing:
        synthetic.make_dataset(root, classes=missing, n_train=n_train, n_good_test=n_test, n_defect_test=n_test,
                               size=size)
    return root


def detector_config(size: int, batch_size: int = 16) -> dict[str, Any]:
    """The Detector config of the two settings: 224 (resize 256, crop 224) or 512 (resize 512, no crop)."""
    data = {"resize": 256, "crop": 224} if size == 224 else {"resize": size, "crop": None}
    return {"data": {**data, "batch_size": batch_size, "num_workers": 0}, "backbone": {"weights": "none"},
            "device": "cpu", "bank": {"radius": "auto"}}


def real_features(root: Path, name: str, size: int, n_images: int, cache: Path, split: str = "train") -> np.ndarray:
    """Patch features [n_images * h * w, 1536] of a class's first ``split`` images, cached as .npy (memory-mapped)."""
    from ocbank.data.datasets import mvtec_split  # noqa: PLC0415
    from ocbank.model.detector import Detector  # noqa: PLC0415

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


class FlatSearch:
    """1-NN over a fixed [K, C] array with the same search for every method.

    CPU: ``faiss.knn``. CUDA: ``faiss.knn_gpu`` with the faiss GPU build, else the banks'
    own torch search (:func:`ocbank.engine.knn.torch_knn`, fp32), as a CUDA bank does.
    """

    def __init__(self, vectors: np.ndarray, device: str) -> None:
        from ocbank.engine._faiss import faiss, faiss_has_gpu  # noqa: PLC0415

        self.faiss = faiss
        self.device = device
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.res = None
        if device.startswith("cuda"):
            self.gpu_vectors = torch.from_numpy(self.vectors).to(device)
            self.gpu_norms = (self.gpu_vectors.double() ** 2).sum(1)
            if faiss_has_gpu():
                import faiss.contrib.torch_utils  # noqa: F401, PLC0415

                self.res = faiss.StandardGpuResources()

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        """[n, C] -> [n] plain L2 distances to the nearest vector."""
        if self.device.startswith("cuda"):
            from ocbank.engine.knn import torch_knn  # noqa: PLC0415

            q = torch.from_numpy(queries).to(self.device)
            if self.res is not None:
                sq, _ = self.faiss.knn_gpu(self.res, q, self.gpu_vectors, 1)
            else:
                sq, _ = torch_knn(q, self.gpu_vectors, self.gpu_norms, 1)
            torch.cuda.synchronize()
            sq = sq.cpu().numpy()
        else:
            sq, _ = self.faiss.knn(queries, self.vectors, 1)
        return np.sqrt(np.maximum(sq[:, 0], 0.0))


# ---------------------------------------------------------------------- device memory
class PeakMemory:
    """Peak device memory of a block: ``with PeakMemory(device) as peak: ...; peak.to_dict()``.

    On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors
    only), and this process's share of the GPU from NVML (``pynvml``) sampled every
    ``interval`` seconds, which also counts the CUDA context and the caching allocator's
    reserve. Without CUDA, or without pynvml, those fields are None and ``note`` says why.
    """

    def __init__(self, device: str, interval: float = 0.05) -> None:
        self.device = device
        self.interval = interval
        self.torch_peak: int | None = None
        self.nvml_peak: int | None = None
        self.notes: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if not self.device.startswith("cuda"):
            self.notes.append(f"device {self.device}: peak device memory is measured on CUDA only")
            return self
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        handle, why = _nvml_handle(torch.device(self.device).index or 0)  # the pid's share on this device
        if handle is None:
            self.notes.append(why)
        else:
            self._thread = threading.Thread(target=self._sample, args=(handle,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, handle: Any) -> None:
        while True:
            used = nvml_process_bytes(handle)
            if used is not None:
                self.nvml_peak = max(self.nvml_peak or 0, used)
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc: object) -> None:
        if not self.device.startswith("cuda"):
            return
        torch.cuda.synchronize(self.device)
        self.torch_peak = int(torch.cuda.max_memory_allocated(self.device))
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self.nvml_peak is None:
                self.notes.append("NVML listed no compute process with this pid (e.g. inside a container)")

    def to_dict(self) -> dict[str, Any]:
        return {"torch_max_allocated_bytes": self.torch_peak, "nvml_process_bytes": self.nvml_peak,
                "note": "; ".join(self.notes) or None}


def _nvml_handle(index: int) -> tuple[Any, str]:
    """(the NVML handle of CUDA device ``index``, "") or (None, why there is none).

    NVML numbers all GPUs; CUDA only the visible ones, so CUDA_VISIBLE_DEVICES maps between them.
    """
    try:
        import pynvml  # noqa: PLC0415
    except ImportError:
        return None, "pynvml is not installed: no NVML process share (pip install nvidia-ml-py)"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    try:
        pynvml.nvmlInit()
        if index < len(visible):
            name = visible[index]
            if name.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(name)), ""
            return pynvml.nvmlDeviceGetHandleByUUID(name), ""
        return pynvml.nvmlDeviceGetHandleByIndex(index), ""
    except Exception as exc:  # noqa: BLE001  (NVML is optional)
        return None, f"NVML unavailable: {exc}"


def nvml_process_bytes(handle: Any) -> int | None:
    """GPU memory NVML reports for this process on ``handle``'s device, or None."""
    import pynvml  # noqa: PLC0415

    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # noqa: BLE001
        return None
    pid = os.getpid()
    used = [int(p.usedGpuMemory) for p in procs if p.pid == pid and p.usedGpuMemory is not None]
    return max(used) if used else None


# ---------------------------------------------------------------------- the bank and the harness's features
def stream_build(batches, radius: float) -> dict:
    """Stream batches [784, DIM] into a CPU ClusterBank; per-batch K, new centroids and effective FLOPs."""
    from ocbank import ClusterBank

    warm = ClusterBank(DIM, radius)
    warm.add(np.random.default_rng(0).standard_normal((8, DIM), dtype=np.float32))  # compile outside the timing
    bank = ClusterBank(DIM, radius)
    flops = seconds = 0.0
    k_trace, new_per_batch = [], []
    for x in batches:
        k_before = len(bank)
        t = time.perf_counter()
        bank.add(x)
        seconds += time.perf_counter() - t
        flops += 2.0 * DIM * k_before * len(x)
        new_per_batch.append(len(bank) - k_before)
        k_trace.append((bank.n_seen, len(bank)))
    return {"seconds": seconds, "flops": flops, "k": len(bank), "n": bank.n_seen, "trace": k_trace,
            "new_per_batch": new_per_batch}


SMOKE_TRAIN, SMOKE_TEST = 12, 10  # images per class in a --smoke run


@dataclass
class ClassFeatures:
    name: str
    train: np.ndarray  # [n_train, h, w, C] float32
    test: np.ndarray  # [n_test, h, w, C] float32
    labels: np.ndarray  # [n_test]
    masks: np.ndarray  # [n_test, S, S] uint8
    feature_seconds_per_image: float


def load_features(path: Path) -> list[ClassFeatures]:
    """Classes saved by ``python -m benchmarks.scoring_modes cache`` (features only: no extraction time)."""
    data = np.load(path)
    names = list(dict.fromkeys(k.split("/")[0] for k in data.files))
    return [ClassFeatures(n, data[f"{n}/train"], data[f"{n}/test"], data[f"{n}/labels"], data[f"{n}/masks"],
                          float("nan")) for n in names]


def extract(det: Detector, split: Any, smoke: bool) -> ClassFeatures:
    train_samples = split.train[:SMOKE_TRAIN] if smoke else split.train
    test_samples = split.test
    if smoke:  # keep both labels
        good = [s for s in test_samples if s.label == 0][: SMOKE_TEST // 2]
        bad = [s for s in test_samples if s.label == 1][: SMOKE_TEST // 2]
        test_samples = good + bad
    train = [f.cpu().numpy() for b, f in det.features(train_samples) if b.index]
    test, labels, masks = [], [], []
    t = time.perf_counter()
    for batch, feats in det.features(test_samples, with_masks=True):
        if not batch.index:
            continue
        test.append(feats.cpu().numpy())
        labels += [test_samples[i].label for i in batch.index]
        masks.append(batch.mask)
    n_test = sum(len(x) for x in test)
    return ClassFeatures(
        split.name,
        np.concatenate(train),
        np.concatenate(test),
        np.array(labels),
        np.concatenate(masks),
        (time.perf_counter() - t) / max(n_test, 1),
    )
