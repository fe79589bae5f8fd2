"""One turn of the learning loop on a live ``ocbank serve``, under load (loopback only, bounded).

On one calibrated bank built here (random-initialised WideResNet-50 on the synthetic
textures: the same arithmetic as ImageNet weights), at ``--size`` crops:

1. ``ocbank serve`` (its own local Ray, an admin token) with ``--clients`` clients
   inspecting back to back for the whole run;
2. the cycle: ``--feedback`` normal images sent as OK feedback, ``POST .../learn``, and
   the wait until the new version is served (the learn's gated update in its Ray task,
   then the reload), timed from the first feedback to the first inspection answered by
   the new version;
3. the inspections' latency in the ``--before-s`` seconds before the cycle and during it,
   side by side in one run, and any request that failed.

The growth guard's default refuses 20 new images for a bank of this size built on 40
images (they add more than 10% of K), so the benchmark passes ``--max-new-centroids``
(recorded in the result) to time the cycle itself.

Writes ``<out>/learn_cpu.json`` with the machine and the date.

Usage: python -m benchmarks.bench_learn [--size 224] [--feedback 20] [--clients 3]
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import machine_info, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.serve_helpers: the one way the tests run a server

LOAD_LIMIT_S = 1800.0  # the load clients stop by then whatever happens


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    v = 1000.0 * np.asarray(values)
    return {"n": len(values), "p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99))}


def build(work: Path, size: int, n_train: int, n_calibration: int, n_feedback: int) -> tuple[Path, list[Path]]:
    """A calibrated bank (``banks/weave.h5``) and the normal images to send as feedback."""
    from ocbank.model.detector import Detector
    from ocbank.synthetic import make_dataset

    root = make_dataset(work / "data", classes=("weave",), n_train=n_train + n_calibration, n_good_test=n_feedback + 1,
                        n_defect_test=1, size=round(size * 256 / 224))
    train = sorted((root / "weave" / "train" / "good").glob("*.png"))
    bank = work / "banks" / "weave.h5"
    bank.parent.mkdir(parents=True)
    Detector(weights="none", image_size=size, radius="auto", radius_images=4, device="cpu",
             false_alarm_rate=0.05).fit(train[:n_train]).calibrate(train[n_train:]).save(bank)
    return bank, sorted((root / "weave" / "test" / "good").glob("*.png"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.serve_helpers import Client, start_server, stop_server

    with tempfile.TemporaryDirectory(prefix="bench-learn-") as tmp:
        work = Path(tmp)
        began = time.perf_counter()
        bank, images = build(work, args.size, args.n_train, args.n_calibration, args.feedback)
        build_s = time.perf_counter() - began
        token = secrets.token_hex(32)
        token_file = work / "admin.token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        server = start_server(bank.parent, work / "serve.log", token_file)
        try:
            client = Client(server["port"], token)
            feedback, probe = images[: args.feedback], images[-1].read_bytes()
            old = hashlib.sha256(bank.read_bytes()).hexdigest()
            rows: list[tuple[float, float, int, str]] = []  # (sent at, seconds, status, bank sha)
            done = threading.Event()

            def inspect() -> None:
                c = Client(server["port"])
                deadline = time.monotonic() + LOAD_LIMIT_S
                while not done.is_set() and time.monotonic() < deadline:
                    sent = time.perf_counter()
                    try:
                        status, answer, _ = c.call("POST", "/v1/inspect/weave", probe)
                    except OSError:
                        status, answer = 0, {}
                    rows.append((sent, time.perf_counter() - sent, status, answer.get("bank_sha256", "")))

            workers = [threading.Thread(target=inspect) for _ in range(args.clients)]
            for w in workers:
                w.start()
            try:
                time.sleep(args.warm_s)  # latency before the cycle, under the same load
                cycle_start = time.perf_counter()
                for f in feedback:
                    status, answer, _ = client.call("POST", "/v1/banks/weave/feedback?label=OK", f.read_bytes())
                    assert status == 202, answer
                feedback_s = time.perf_counter() - cycle_start
                query = f"?max_new_centroids={args.max_new_centroids}" if args.max_new_centroids else ""
                status, answer, _ = client.call("POST", f"/v1/banks/weave/learn{query}")
                assert status == 202, answer
                report = client.wait_learn("weave", limit_s=LOAD_LIMIT_S)
                learned = time.perf_counter()
                if report["state"] != "succeeded":
                    msg = f"the learn did not succeed: {report.get('error')}"
                    raise SystemExit(msg)
                new = report.get("new_sha256")
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not any(r[3] == new and r[0] >= cycle_start for r in rows):
                    time.sleep(0.05)
                served = [r[0] + r[1] for r in rows if r[3] == new and r[0] >= cycle_start]
                cycle_end = min(served) if served else None
                time.sleep(1.0)
            finally:
                done.set()
                for w in workers:
                    w.join(timeout=120)
        finally:
            stop_server(server)
    before = [r[1] for r in rows if cycle_start - args.before_s <= r[0] < cycle_start]
    during = [r[1] for r in rows if cycle_start <= r[0] < learned]
    return {
        "benchmark": "learn",
        "machine": machine_info(note=args.note),
        "size": args.size,
        "n_train": args.n_train,
        "n_calibration": args.n_calibration,
        "feedback_images": args.feedback,
        "load_clients": args.clients,
        "build_s": build_s,
        "learn": {k: report.get(k) for k in ("state", "absorbed", "held_back", "old_sha256", "new_sha256", "seconds",
                                              "error")},
        "max_new_centroids": args.max_new_centroids,
        "before_window_s": args.before_s,
        "changed": new != old,
        "feedback_s": feedback_s,
        "cycle_s": (cycle_end - cycle_start) if cycle_end else None,
        "inspections_before": _percentiles(before),
        "inspections_during": _percentiles(during),
        "p50_ratio_during_over_before": (np.percentile(during, 50) / np.percentile(before, 50)) if before and during else None,
        "failed_requests": sum(1 for r in rows if r[2] != 200),
        "requests": len(rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-calibration", type=int, default=20)
    p.add_argument("--feedback", type=int, default=20)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--warm-s", type=float, default=60.0, help="seconds of load before the cycle (the first load the banks)")
    p.add_argument("--before-s", type=float, default=30.0, help="the last seconds of it whose latency is the baseline")
    p.add_argument("--max-new-centroids", type=float, default=0.25,
                   help="the learn's growth guard, as a fraction of K (0: the server's default)")
    p.add_argument("--note", help="a note stored with the machine info")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    write_result(args.out, "learn_cpu.json", run(args))


if __name__ == "__main__":
    main()
