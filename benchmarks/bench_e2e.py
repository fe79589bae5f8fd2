"""End-to-end images/s: features + 1-NN search + anomaly maps, batches of 32.

Random images at --size through the WideResNet-50 extractor (optionally under
fp16/bf16 autocast on CUDA), searched against a bank of --centroids synthetic
centroids, then upsampled and blurred into maps, as `predict` does. Records peak
device memory of building the bank and of scoring (null with a note on the CPU).

python -m benchmarks.bench_e2e --out DIR [--device cuda] [--autocast fp16] [--size 224]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ocbank import ClusterBank
from ocbank.engine.device import resolve_device
from ocbank.model.features import FEATURE_DIM, FeatureExtractor
from ocbank.model.scoring import anomaly_maps, image_scores

from .common import PeakMemory, write_result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--autocast", default="none", choices=["none", "fp16", "bf16"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--centroids", type=int, default=20000)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    extractor = FeatureExtractor(weights="none", device=device, autocast=args.autocast)
    rng = np.random.default_rng(0)
    bank = ClusterBank(FEATURE_DIM, 1e-3, device=device)
    with PeakMemory(device) as build_memory:
        bank.add(rng.standard_normal((args.centroids, FEATURE_DIM), dtype=np.float32))
    images = torch.randn(args.batch, 3, args.size, args.size)
    if device.startswith("cuda"):
        images = images.pin_memory()

    def step() -> None:
        feats = extractor(images)
        b, h, w, _ = feats.shape
        dist, _ = bank.search(feats.reshape(-1, FEATURE_DIM))
        grid = dist.reshape(b, h, w)
        image_scores(grid)
        anomaly_maps(grid, args.size)

    for _ in range(3):
        step()
    with PeakMemory(device) as score_memory:
        t = time.perf_counter()
        for _ in range(args.batches):
            step()
        seconds = time.perf_counter() - t
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "size": args.size,
        "batch": args.batch,
        "autocast": args.autocast,
        "centroids": len(bank),
        "e2e_fps": args.batch * args.batches / seconds,
        "search_backend": bank.search_backend,
        "build_device_memory": build_memory.to_dict(),
        "score_device_memory": score_memory.to_dict(),
    }
    write_result(args.out, "e2e.json", result)
    return result


if __name__ == "__main__":
    main()
