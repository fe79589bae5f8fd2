"""``ocbank serve`` under load beside in-process scoring, in one run (loopback only, bounded).

On one bank built here (random-initialised WideResNet-50 on synthetic images: the
same arithmetic as ImageNet weights), at ``--size`` crops and ``--max-batch``:

1. in process, interleaved round by round: ``Detector.predict`` on the image files
   (decode + backbone + faiss 1-NN, batch = max-batch), and the serving runtimes
   (torch and onnxruntime, :class:`ocbank.serve.runtime.ServedBank`) on decoded crops,
   with their largest score difference from ``Detector.predict`` over the map range;
2. the memory a second product costs a replica: its bank with the backbone shared
   (one multiplexed deployment) vs a backbone of its own (a deployment per product);
3. ``ocbank serve`` (its own local Ray) with 1, 4 and 8 concurrent async clients, each
   sending encoded images back to back: img/s, p50 and p99 latency, errors.

Writes ``<out>/serve_cpu.json`` with the machine and the date.

Usage: python -m benchmarks.bench_serve [--size 224] [--images 32] [--max-batch 8] [--runtime auto]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import machine_info, write_result


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bank(work: Path, size: int, n_train: int) -> tuple[Path, list[Path]]:
    """A calibrated bank on synthetic images (weights none) and the test images to send."""
    from ocbank.model.detector import Detector
    from ocbank.synthetic import make_dataset

    root = make_dataset(work / "data", classes=("weave",), n_train=n_train, n_good_test=8, n_defect_test=4,
                        size=round(size * 256 / 224))
    train = sorted((root / "weave" / "train" / "good").glob("*.png"))
    det = Detector(weights="none", image_size=size, radius="auto", radius_images=4, device="cpu")
    bank = work / "banks" / "weave.h5"
    bank.parent.mkdir(parents=True, exist_ok=True)
    det.fit(train[:-4]).calibrate(train[-4:]).save(bank)
    tests = sorted((root / "weave" / "test").rglob("*.png"))
    return bank, tests


def in_process(bank: Path, files: list[Path], n_images: int, batch: int, rounds: int, threads: int) -> dict[str, Any]:
    """img/s of Detector.predict (files) and of each serving runtime (decoded crops), interleaved."""
    import torch

    from ocbank.data.images import open_image
    from ocbank.model.detector import Detector
    from ocbank.serve.banks import validate_bank
    from ocbank.serve.runtime import ServedBank

    torch.set_num_threads(threads)
    det = Detector.load(bank, device="cpu")
    det.config = dataclasses.replace(det.config, data=dataclasses.replace(det.config.data, batch_size=batch))
    paths = [str(files[i % len(files)]) for i in range(n_images)]
    info = validate_bank("weave", bank.read_bytes(), str(bank))
    pixels = np.stack([info.transform.image(open_image(p))[1] for p in paths])
    sha = info.sha256
    runtimes: dict[str, Any] = {"torch": ServedBank.load(bank, sha, "torch", threads=threads, batch=batch)}
    export_s = None
    try:
        began = time.perf_counter()
        runtimes["onnxruntime"] = ServedBank.load(bank, sha, "onnxruntime", threads=threads, batch=batch)
        export_s = time.perf_counter() - began
    except Exception as exc:  # noqa: BLE001 - reported, the rest still runs
        print(f"onnxruntime unavailable: {exc}")
    ref = det.predict(paths)
    span = float(ref.maps.max() - ref.maps.min())
    parity = {}
    for name, served in runtimes.items():
        got = np.concatenate([served.runtime(pixels[i : i + batch])[0] for i in range(0, n_images, batch)])
        parity[name] = float(np.abs(got - ref.scores).max() / span)
    seconds: dict[str, list[float]] = {"detector_predict": [], **{k: [] for k in runtimes}}
    for _ in range(rounds):  # interleaved: machine load hits every path alike
        began = time.perf_counter()
        det.predict(paths)
        seconds["detector_predict"].append(time.perf_counter() - began)
        for name, served in runtimes.items():
            began = time.perf_counter()
            for i in range(0, n_images, batch):
                served.runtime(pixels[i : i + batch])
            seconds[name].append(time.perf_counter() - began)
    return {
        "images_per_s": {k: n_images / min(v) for k, v in seconds.items()},
        "seconds_per_pass": seconds,
        "max_score_diff_over_map_range": parity,
        "onnx_export_and_load_s": export_s,
    }


def multiplex_memory(bank: Path) -> dict[str, float]:
    """RSS a second product adds: backbone shared (one multiplexed deployment) vs its own (one per product).

    Measured in a fresh process (spawned), where no freed memory of earlier steps can be reused.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_multiplex_memory, bank).result(timeout=600)


def _multiplex_memory(bank: Path) -> dict[str, float]:
    from ocbank.model.detector import Detector

    base = _rss_mb()
    first = Detector.load(bank, device="cpu")
    _ = first.extractor
    one = _rss_mb()
    shared = Detector.load(bank, device="cpu", extractor=first.extractor)
    two_shared = _rss_mb()
    own = Detector.load(bank, device="cpu")
    _ = own.extractor
    two_own = _rss_mb()
    del first, shared, own
    return {
        "first_product_mb": one - base,
        "second_product_shared_backbone_mb": two_shared - one,
        "second_product_own_backbone_mb": two_own - two_shared,
    }


async def _client(session: Any, url: str, bodies: list[bytes], quota: list[int], deadline: float,
                  latencies: list[float], errors: dict[str, int], offset: int) -> None:
    k = offset
    while quota[0] > 0 and time.monotonic() < deadline:
        quota[0] -= 1
        began = time.perf_counter()
        async with session.post(url, data=bodies[k % len(bodies)]) as resp:
            await resp.read()
            if resp.status == 200:
                latencies.append(time.perf_counter() - began)
            else:
                errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
        k += 1


async def load_levels(port: int, files: list[Path], levels: list[int], n_images: int, limit_s: float) -> dict:
    import aiohttp

    bodies = [f.read_bytes() for f in files]
    url = f"http://127.0.0.1:{port}/v1/inspect/weave"
    out = {}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as session:
        warm: list[float] = []
        await _client(session, url, bodies, [8], time.monotonic() + limit_s, warm, {}, 0)
        for clients in levels:
            latencies: list[float] = []
            errors: dict[str, int] = {}
            quota = [n_images]
            deadline = time.monotonic() + limit_s
            began = time.perf_counter()
            await asyncio.gather(*(_client(session, url, bodies, quota, deadline, latencies, errors, i)
                                   for i in range(clients)))
            elapsed = time.perf_counter() - began
            p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
            out[str(clients)] = {
                "images": len(latencies),
                "errors": errors,
                "n_errors": sum(errors.values()),
                "images_per_s": len(latencies) / elapsed,
                "p50_ms": 1000 * p50,
                "p99_ms": 1000 * p99,
                "p99_over_p50": p99 / p50 if p50 else None,
            }
            print(f"{clients} client(s): {out[str(clients)]}")
    return out


def served(bank_dir: Path, files: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    from ocbank.serve import ServeOptions
    from ocbank.serve.server import Server

    port = _free_port()
    options = ServeOptions(banks=str(bank_dir), port=port, max_batch=args.max_batch,
                           batch_wait_ms=args.batch_wait_ms, runtime=args.runtime, cpus=args.cpus)
    began = time.perf_counter()
    server = Server(options).start()
    try:
        start_s = time.perf_counter() - began
        levels = asyncio.run(load_levels(port, files, args.clients, args.images, args.limit_s))
    finally:
        server.stop()
    return {"start_s": start_s, "clients": levels}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="crop side S (default 224)")
    ap.add_argument("--images", type=int, default=32, help="images per measurement (default 32)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    ap.add_argument("--rounds", type=int, default=2, help="in-process rounds (the best is kept)")
    ap.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime"])
    ap.add_argument("--cpus", type=int, default=None, help="CPUs for the server (default: all)")
    ap.add_argument("--limit-s", type=float, default=300.0, help="time limit per load level (default 300 s)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="serve_cpu.json")
    args = ap.parse_args(argv)
    cpus = args.cpus or os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bank, files = build_bank(work, args.size, n_train=16)
        local = in_process(bank, files, args.images, args.max_batch, args.rounds, threads=cpus)
        print(json.dumps(local["images_per_s"], indent=2))
        memory = multiplex_memory(bank)
        print(json.dumps(memory, indent=2))
        remote = served(bank.parent, files, args)
    served_runtime = "onnxruntime" if args.runtime == "auto" and "onnxruntime" in local["images_per_s"] else (
        "torch" if args.runtime == "auto" else args.runtime)
    top = str(max(args.clients))
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),  # load averages below say how busy it was
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "settings": {"size": args.size, "images": args.images, "max_batch": args.max_batch,
                     "batch_wait_ms": args.batch_wait_ms, "runtime": args.runtime, "served_runtime": served_runtime,
                     "replicas": 1, "threads": cpus},
        "in_process": local,
        "multiplex_memory": memory,
        "served": remote,
        "ratio_at_max_clients": {
            "vs_in_process_same_runtime": remote["clients"][top]["images_per_s"] / local["images_per_s"][served_runtime],
            "vs_detector_predict": remote["clients"][top]["images_per_s"] / local["images_per_s"]["detector_predict"],
            "p99_over_p50": remote["clients"][top]["p99_over_p50"],
        },
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = write_result(args.out, args.name, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
