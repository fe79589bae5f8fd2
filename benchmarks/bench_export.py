"""Exported graph (onnxruntime, CPU) beside the PyTorch paths, and the torch blur beside scipy's.

On one bank (default: the demo's first class, 224^2 crops), in one run and
interleaved round by round so that machine load hits every path alike:

- ``detector``: what ``Detector.score_batches`` does after the loader:
  ImageNet normalisation, FeatureExtractor, faiss 1-NN, image scores, maps;
- ``torch_module``: :class:`ocbank.model.module.AnomalyModel` in torch;
- ``onnxruntime``: the file ``ocbank export`` writes, in onnxruntime's CPU provider;
- the map blur alone on a batch of maps: the torch blur (two matrix products,
  torch's threads and one thread) vs scipy's ``gaussian_filter`` image by image.

Also the exported file's size beside the bank file's, and the export time.

Usage: python -m benchmarks.bench_export [--bank demo_out/banks/dots.h5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .common import machine_info, timed, write_result


def _timed(fn: Callable[[], object]) -> float:
    return timed(fn)[1]


def main(argv: list[str] | None = None) -> int:
    from ocbank.data.images import normalize
    from ocbank.model.detector import Detector
    from ocbank.model.export import build_model, export_onnx
    from ocbank.model.features import FEATURE_DIM
    from ocbank.model.scoring import anomaly_maps, blur_maps, image_scores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", default=None, help="bank file (default: the first of demo_out/banks/*.h5)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--images", type=int, default=16, help="images per timed pass (default 16)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    bank = Path(args.bank) if args.bank else sorted(p for p in Path("demo_out/banks").glob("*.h5")
                                                   if ".partial" not in p.name)[0]
    det = Detector.load(bank, device="cpu")
    size = det.config.image_size
    sigma = det.config.scoring.sigma
    model, props = build_model(bank)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        export_s = _timed(lambda: export_onnx(model, onnx_file, props))
        onnx_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    batches = [rng.random((args.batch, 3, size, size), dtype=np.float32) for _ in range(args.images // args.batch)]
    n_images = args.batch * len(batches)

    def detector_path() -> None:
        for x in batches:
            feats = det.extractor(normalize(torch.from_numpy(x)))
            b, h, w, _ = feats.shape
            dist, _ = det.bank.search(feats.reshape(-1, FEATURE_DIM), k=1)
            grid = dist.reshape(b, h, w)
            image_scores(grid), anomaly_maps(grid, size, sigma)

    def module_path() -> None:
        with torch.inference_mode():
            for x in batches:
                model(torch.from_numpy(x))

    def onnx_path() -> None:
        for x in batches:
            session.run(None, {"image": x})

    maps = rng.random((args.batch, size, size), dtype=np.float32) * 30

    def blur_torch() -> None:
        blur_maps(maps, sigma)

    def blur_torch_1_thread() -> None:  # small matmuls: one thread avoids barriers on a loaded machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            blur_maps(maps, sigma)
        finally:
            torch.set_num_threads(threads)

    def blur_scipy() -> None:
        from scipy.ndimage import gaussian_filter

        np.stack([gaussian_filter(m, sigma) for m in maps])

    paths = {"detector": detector_path, "torch_module": module_path, "onnxruntime": onnx_path}
    blurs = {"torch_matmul": blur_torch, "torch_matmul_1_thread": blur_torch_1_thread, "scipy_per_image": blur_scipy}
    for fn in [*paths.values(), *blurs.values()]:
        fn()  # warm-up: allocations, oneDNN/ORT kernel selection
    times: dict[str, list[float]] = {k: [] for k in [*paths, *blurs]}
    for _ in range(args.rounds):  # interleaved: load on the machine hits every path alike
        for name, fn in [*paths.items(), *blurs.items()]:
            times[name].append(_timed(fn) if name in paths else min(_timed(fn) for _ in range(5)))
    img_s = {k: n_images / statistics.median(times[k]) for k in paths}
    blur_ms = {k: 1e3 * statistics.median(times[k]) for k in blurs}
    result = {
        "bank": str(bank),
        "bank_file_mb": bank.stat().st_size / 1e6,
        "onnx_file_mb": onnx_bytes / 1e6,
        "export_s": export_s,
        "n_centroids": len(det.bank),
        "image_size": size,
        "sigma": sigma,
        "images_per_pass": n_images,
        "batch": args.batch,
        "rounds": args.rounds,
        "images_per_s": img_s,
        "onnxruntime_vs_detector": img_s["onnxruntime"] / img_s["detector"],
        "onnxruntime_vs_torch_module": img_s["onnxruntime"] / img_s["torch_module"],
        "blur_ms_per_batch": blur_ms,
        "blur_scipy_vs_torch": blur_ms["scipy_per_image"] / blur_ms["torch_matmul"],
        "blur_scipy_vs_torch_1_thread": blur_ms["scipy_per_image"] / blur_ms["torch_matmul_1_thread"],
        "load_average_1min": os.getloadavg()[0],
        "seconds_per_pass": times,
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "machine": machine_info(),
    }
    path = write_result(args.out, "export_cpu.json", result)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
