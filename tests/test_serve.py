"""``ocbank serve`` end to end over loopback HTTP: one server subprocess for the whole module.

The tests run in file order against the same server (built once: ~30 s): parity with
``ocbank predict``, batching, bad input, overload, hot reload under load, then the
faults (SIGKILL of the model replica, SIGTERM of the server), which end it. Every loop
is bounded in count and time. Skipped where the ``serve`` extra is absent.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
psutil = pytest.importorskip("psutil")

from tests.serve_helpers import free_port, stop_server, tree  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MAX_BATCH = 8
MAX_QUEUED = 16  # Serve counts requests waiting for a replica slot: a burst of 8 needs room
START_S = 240  # a cold Ray + Serve start on a busy 2-core machine
HTTP_TIMEOUT_S = 60


# ---------------------------------------------------------------------- helpers
class Client:
    """A tiny loopback HTTP client (stdlib only): one connection per call, JSON bodies."""

    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout: float = HTTP_TIMEOUT_S) -> tuple[int, dict | str, float]:
        began = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read().decode()
            kind = resp.getheader("content-type") or ""
        finally:
            conn.close()
        data = json.loads(raw) if "json" in kind else raw
        return resp.status, data, time.perf_counter() - began

    def inspect(self, product: str, body: bytes, query: str = "", headers: dict | None = None):
        return self.call("POST", f"/v1/inspect/{product}{query}", body, headers)

    def get(self, path: str):
        return self.call("GET", path)


def _histogram(text: str, name: str, product: str) -> dict[str, float]:
    """Prometheus text -> {le: cumulative count} of one histogram for one product (plus 'count')."""
    out = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{") and f'product="{product}"' in line:
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count{{") and f'product="{product}"' in line:
            out["count"] = float(line.rsplit(" ", 1)[1])
    return out


def _replica_pids(pid: int, deployment: str = "Scorer") -> set[int]:
    found = set()
    for p in tree(pid):
        with contextlib.suppress(psutil.Error):
            if f"ServeReplica:ocbank:{deployment}" in " ".join(p.cmdline()):
                found.add(p.pid)
    return found


def _private_bytes(pids: set[int]) -> int:
    """Memory the processes hold alone (USS): not the object store's shared pages, which they only map."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().uss
    return total


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header whose IHDR declares ``width`` x ``height`` (8-bit gray), with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Banks (weave calibrated, dots uncalibrated, probe for reloads) and a running ``ocbank serve``.

    Beside them, banks that cannot be loaded: ``broken`` (a corrupt file, refused by the ingress)
    and, on a machine without CUDA, ``gpu_only`` (its config asks for CUDA: refused by the replica).
    """
    from ocbank.engine import cuda_available
    from ocbank.model.detector import Detector
    from ocbank.synthetic import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("data"), n_train=10, n_good_test=10, n_defect_test=5, size=80)
    banks = tmp_path_factory.mktemp("banks")
    spare = tmp_path_factory.mktemp("spare")

    def detector() -> Detector:
        return Detector(weights="none", image_size=64, resize=72, radius="auto", radius_images=3, device="cpu",
                        batch_size=4)

    weave = sorted((root / "weave" / "train" / "good").glob("*.png"))
    dots = sorted((root / "dots" / "train" / "good").glob("*.png"))
    detector().fit(weave[:7]).calibrate(weave[7:]).save(banks / "weave.h5")
    detector().fit(dots[:6]).save(banks / "dots.h5")
    shutil.copy(banks / "weave.h5", banks / "probe.h5")
    detector().fit(dots[:4]).calibrate(dots[4:]).save(spare / "probe_new.h5")  # a different bank for the reload
    corrupt = bytearray((banks / "dots.h5").read_bytes())
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = b"\x00" * 64
    (banks / "broken.h5").write_bytes(bytes(corrupt))
    unservable = ["broken"]
    if not cuda_available():
        _with_device(banks / "weave.h5", banks / "gpu_only.h5", "cuda")
        unservable.append("gpu_only")

    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")  # noqa: SIM115 - closed in teardown
    cmd = [sys.executable, "-m", "ocbank.cli", "serve", "--banks", str(banks), "--port", str(port),
           "--runtime", "torch", "--max-batch", str(MAX_BATCH), "--batch-wait-ms", "50",
           "--max-queued", str(MAX_QUEUED), "--cpus", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    client = Client(port)
    deadline = time.monotonic() + START_S
    ready = False
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if client.get("/readyz")[0] == 200:
                ready = True
                break
        time.sleep(1.0)
    info = {"proc": proc, "client": client, "banks": banks, "spare": spare, "root": root, "log": log, "port": port,
            "unservable": unservable}
    try:
        if not ready:
            log.seek(0)
            pytest.fail(f"ocbank serve did not become ready in {START_S} s:\n{log.read()[-3000:]}")
        yield info
    finally:
        stop_server({"proc": proc, "log": log}, wait_s=45)  # never leaves a Ray process behind


def _with_device(src: Path, dst: Path, device: str) -> None:
    """A copy of the bank ``src`` whose config asks for ``device``."""
    import dataclasses

    from ocbank.engine.checkpoint import read_bank, write_bank

    state = read_bank(src)
    meta = dict(state.metadata)
    meta["config"] = {**meta["config"], "device": device}
    write_bank(dst, dataclasses.replace(state, metadata=meta))


def _log(served) -> str:
    served["log"].flush()
    return Path(served["log"].name).read_text(errors="replace")


def _test_images(served, n: int = 20) -> list[Path]:
    root = served["root"] / "weave" / "test"
    files = sorted((root / "good").glob("*.png")) + sorted((root / "blob").glob("*.png")) + sorted(
        (root / "scratch").glob("*.png"))
    return files[:n]


# ---------------------------------------------------------------------- tests
def test_health_readiness_banks_and_metrics(served):
    c = served["client"]
    assert c.get("/healthz")[:2] == (200, {"status": "ok"})
    status, body, _ = c.get("/readyz")
    assert status == 200 and body["banks"] == ["dots", "probe", "weave"]
    status, body, _ = c.get("/v1/banks")
    assert status == 200 and sorted(body["banks"]) == ["dots", "probe", "weave"]
    import hashlib

    weave = body["banks"]["weave"]
    assert weave["bank_sha256"] == hashlib.sha256((served["banks"] / "weave.h5").read_bytes()).hexdigest()
    assert all("sha256" not in row for row in body["banks"].values())  # one spelling: bank_sha256
    assert weave["calibrated"] and weave["thresholds"]["image_threshold"] > 0 and weave["n_centroids"] > 0
    assert body["banks"]["dots"]["calibrated"] is False and body["banks"]["dots"]["thresholds"] is None
    status, text, _ = c.get("/metrics")
    assert status == 200 and "# TYPE ocbank_batch_size histogram" in text
    status, body, _ = c.get("/no/such/route")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_parity_with_predict(served, tmp_path):
    """20 images over HTTP = ``ocbank predict`` on the same bank: scores (1e-4 of the map range) and labels."""
    from ocbank.jobs.predict import predict
    from ocbank.model.detector import Detector

    c = served["client"]
    files = _test_images(served)
    assert len(files) == 20
    bank = served["banks"] / "weave.h5"
    rows = predict(bank, [str(f) for f in files], tmp_path / "pred", progress=False, overlays="none")
    det = Detector.load(bank)
    ref = det.predict([str(f) for f in files])
    span = float(np.nanmax(ref.maps) - np.nanmin(ref.maps))
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda f: c.inspect("weave", f.read_bytes(), "?mask=png&map=1"), files))
    threshold = det.decision.image_threshold
    for f, row, (status, body, _), i in zip(files, rows, answers, range(len(files))):
        assert status == 200, body
        assert body["product"] == "weave" and len(body["bank_sha256"]) == 64 and body["latency_ms"] > 0
        assert abs(body["score"] - row["score"]) <= 1e-4 * span, f
        assert body["threshold"] == pytest.approx(threshold)
        assert body["normalized"] == pytest.approx(row["normalized"], rel=1e-4)
        if abs(row["score"] - threshold) > 1e-4 * span:  # a score at the threshold may tip either way
            assert body["label"] == row["label"], f
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"])))) > 0
        assert mask.shape == (64, 64)
        assert (mask == ref.masks[i]).mean() >= 0.99  # pixels at the threshold may tip
        grid = np.asarray(body["map"])
        assert grid.shape == (8, 8)
        expected = ref.maps[i].reshape(8, 8, 8, 8).mean(axis=(1, 3))
        assert np.abs(grid - expected).max() <= 1e-4 * span
    labels = {b["label"] for _, b, _ in answers}
    assert labels <= {"OK", "NG"} and "NG" in labels


def test_uncalibrated_bank_says_so(served):
    f = sorted((served["root"] / "dots" / "test" / "good").glob("*.png"))[0]
    status, body, _ = served["client"].inspect("dots", f.read_bytes(), "?mask=png")
    assert status == 200 and body["score"] > 0
    assert body["label"] is None and body["normalized"] is None and body["threshold"] is None
    assert body["mask"] is None and "no calibrated thresholds" in body["note"]


def test_a_form_upload_scores_like_the_raw_body(served):
    """curl -F file=@part.png (multipart/form-data, one file) gets the raw upload's answer."""
    c = served["client"]
    for f in _test_images(served, 3):
        data = f.read_bytes()
        boundary = "ocbank-test-boundary"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{f.name}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        status, raw, _ = c.inspect("weave", data, "?mask=png")
        got, answer, _ = c.inspect("weave", form, "?mask=png",
                                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert (status, got) == (200, 200), answer
        assert answer["score"] == pytest.approx(raw["score"], abs=1e-5 * max(1.0, abs(raw["score"])))
        assert (answer["label"], answer["threshold"], answer["bank_sha256"]) == (raw["label"], raw["threshold"],
                                                                                 raw["bank_sha256"])
        assert answer["mask"] == raw["mask"]


def test_open_inference_protocol_with_tritonclient(served, tmp_path):
    """tritonclient.http: health, ready, metadata; 20 images score as ``ocbank predict`` (1e-4 of the map range), same labels."""
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    from ocbank.jobs.predict import predict
    from ocbank.model.detector import Detector

    client = httpclient.InferenceServerClient(f"127.0.0.1:{served['port']}", network_timeout=HTTP_TIMEOUT_S)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("weave") and not client.is_model_ready("broken")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    bank = served["banks"] / "weave.h5"
    import hashlib

    sha = hashlib.sha256(bank.read_bytes()).hexdigest()
    meta = client.get_model_metadata("weave")
    assert meta["name"] == "weave" and meta["versions"] == [sha]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "score": ("FP64", [-1]), "normalized": ("FP64", [-1]), "threshold": ("FP64", [-1]),
        "label": ("BYTES", [-1]), "mask": ("BOOL", [-1, 64, 64])}
    assert client.get_model_metadata("weave", model_version=sha)["versions"] == [sha]
    assert [o["name"] for o in client.get_model_metadata("dots")["outputs"]] == ["score"]  # uncalibrated

    files = _test_images(served)
    rows = predict(bank, [str(f) for f in files], tmp_path / "pred", progress=False, overlays="none")
    ref = Detector.load(bank).predict([str(f) for f in files])
    span = float(np.nanmax(ref.maps) - np.nanmin(ref.maps))
    threshold = Detector.load(bank).decision.image_threshold
    names = ("score", "normalized", "threshold", "label", "mask")
    got: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(files), 4):  # four images a request, all in binary (tritonclient's default)
        part = files[start : start + 4]
        image = httpclient.InferInput("image", [len(part)], "BYTES")
        image.set_data_from_numpy(np.array([f.read_bytes() for f in part], dtype=object))
        result = client.infer("weave", [image], request_id=f"batch-{start}",
                              outputs=[httpclient.InferRequestedOutput(n) for n in names])
        assert result.get_response()["id"] == f"batch-{start}" and result.get_response()["model_version"] == sha
        for n in names:
            got[n].extend(result.as_numpy(n))
    for i, (f, row) in enumerate(zip(files, rows)):
        assert abs(got["score"][i] - row["score"]) <= 1e-4 * span, f
        assert got["threshold"][i] == pytest.approx(threshold)
        assert got["normalized"][i] == pytest.approx(row["normalized"], rel=1e-4)
        if abs(row["score"] - threshold) > 1e-4 * span:  # a score at the threshold may tip either way
            assert got["label"][i].decode() == row["label"], f
        assert got["mask"][i].shape == (64, 64) and (got["mask"][i] == ref.masks[i]).mean() >= 0.99
    assert {label.decode() for label in got["label"]} == {"OK", "NG"}

    # JSON tensors (the image as base64), and the protocol's error shape.
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([base64.b64encode(files[0].read_bytes())], dtype=object), binary_data=False)
    result = client.infer("weave", [image], outputs=[httpclient.InferRequestedOutput("score", binary_data=False)])
    assert abs(float(result.as_numpy("score")[0]) - rows[0]["score"]) <= 1e-4 * span
    with pytest.raises(InferenceServerException, match="no bank 'nope'"):
        client.infer("nope", [image])
    status, body, _ = served["client"].call("POST", "/v2/models/weave/infer", b"{not json")
    assert status == 400 and isinstance(body["error"], str) and "not JSON" in body["error"]
    status, body, _ = served["client"].get("/v2/models/weave/no-such-route")
    assert status == 404 and isinstance(body["error"], str)
    client.close()


def test_batching_with_eight_clients(served):
    """8 concurrent clients: most model calls carry two or more images (from the batch-size metric)."""
    c = served["client"]
    before = _histogram(c.get("/metrics")[1], "ocbank_batch_size", "weave")
    files = _test_images(served, 8)
    bodies = [f.read_bytes() for f in files]

    def client(i: int) -> list[int]:
        return [c.inspect("weave", bodies[(i + k) % 8])[0] for k in range(6)]

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for part in pool.map(client, range(8)) for s in part]
    assert statuses == [200] * 48, statuses
    after = _histogram(c.get("/metrics")[1], "ocbank_batch_size", "weave")
    calls = after["count"] - before.get("count", 0)
    singles = after["1.0"] - before.get("1.0", 0)
    images = sum(1 for _ in statuses)
    assert 0 < calls <= images
    assert singles / calls < 0.5, (singles, calls)  # most calls carry >= 2 images


def test_bad_input_gets_4xx_and_keeps_the_replica(served, tmp_path):
    c = served["client"]
    pids = _replica_pids(served["proc"].pid)
    assert len(pids) == 1
    good = _test_images(served, 1)[0]
    rgb = np.asarray(Image.open(good).convert("RGB"))
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG", quality=90)
    cases = {
        "empty": (b"", 400, "empty_body"),
        "truncated JPEG": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], 400, "undecodable"),
        "20k x 20k PNG": (_png_declaring(20000, 20000), 413, "too_large"),
        "text": (b"this is not an image, it is a sentence\n" * 20, 415, "not_an_image"),
    }
    for name, (body, status, code) in cases.items():
        got, answer, _ = c.inspect("weave", body)
        assert (got, answer["error"]["code"]) == (status, code), name
        assert answer["error"]["message"], name
    got, answer, _ = c.inspect("no-such-product", good.read_bytes())
    assert got == 404 and answer["error"]["code"] == "unknown_product"
    got, answer, _ = c.inspect("weave", good.read_bytes(), headers={"X-Timeout-Ms": "0.001"})
    assert got == 408 and answer["error"]["code"] == "timeout"
    # 40 ms is less than the server's 50 ms batch wait: the model call itself times out.
    got, answer, _ = c.inspect("weave", good.read_bytes(), headers={"X-Timeout-Ms": "40"})
    assert got == 408 and answer["error"]["code"] == "timeout"
    got, answer, _ = c.inspect("weave", good.read_bytes(), "?mask=jpeg")
    assert got == 400 and answer["error"]["code"] == "bad_request"

    # A 16-bit PNG is read as predict reads it (value / 257), and scored like it.
    gray16 = (np.asarray(Image.open(good).convert("L")).astype(np.uint16) * 257 + 100).astype(np.uint16)
    path16 = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(path16)
    assert Image.open(path16).mode.startswith("I")
    from ocbank.model.detector import Detector

    det = Detector.load(served["banks"] / "weave.h5")
    ref = det.predict([str(path16)])
    got, answer, _ = c.inspect("weave", path16.read_bytes())
    span = float(ref.maps.max() - ref.maps.min())
    assert got == 200 and abs(answer["score"] - float(ref.scores[0])) <= 1e-4 * span
    assert _replica_pids(served["proc"].pid) == pids  # no replica restarted
    text = c.get("/metrics")[1]
    assert 'status="500"' not in text and 'status="503"' not in text


def test_overload_sheds_the_excess_quickly(served):
    """Bursts larger than the queue: 503 (JSON) for the excess within a second, 200 for the rest, memory back."""
    c = served["client"]
    api_pids = _replica_pids(served["proc"].pid, "Api")
    proc_pids = _replica_pids(served["proc"].pid) | api_pids
    for pid in api_pids:  # the ingress runs with the allocator setting that hands big bodies back
        assert b"MALLOC_MMAP_THRESHOLD_=" in Path(f"/proc/{pid}/environ").read_bytes()
    rng = np.random.default_rng(0)
    small = _png(rng.integers(0, 256, (500, 500, 3), dtype=np.uint8))  # ~750 KB
    big = _png(rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8))  # ~3 MB: a leak of bodies would show
    burst = 2 * MAX_BATCH + MAX_QUEUED + 24  # what the replica holds, the queue, and 24 more
    bursts = 4

    def fire(body: bytes) -> list[tuple[int, dict, float]]:
        gate = threading.Barrier(burst)

        def one(_: int):
            gate.wait(timeout=30)
            return c.inspect("weave", body)

        with ThreadPoolExecutor(burst) as pool:
            results = list(pool.map(one, range(burst)))
        statuses = [s for s, _, _ in results]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= MAX_QUEUED
        assert all(b["error"]["code"] == "overloaded" for s, b, _ in results if s == 503)
        assert 503 in statuses, "no request was shed"
        return results

    # Two bursts warm what a burst needs once (decoder threads, allocator arenas). The time
    # of a 503 includes sending the body: a burst of small ones measures the shedding.
    for _ in range(2):
        fire(big)
    shed_s = sorted(t for s, _, t in fire(small) if s == 503)
    assert shed_s[-1] < 1.0, shed_s
    # What stays from burst to burst levels off (+30 MB over 20 bursts, measured); keeping
    # the admitted bodies (~70 MB a burst) adds up.
    time.sleep(2.0)
    baseline = _private_bytes(proc_pids)
    admitted = sum(len(big) for _ in range(bursts) for s, _, _ in fire(big) if s == 200)
    time.sleep(2.0)
    grown = _private_bytes(proc_pids) - baseline
    # Less than one burst's admitted bodies after four bursts: keeping a third of them fails.
    assert grown < admitted / bursts, (grown, baseline, admitted)

def test_banks_that_cannot_load_are_named_and_the_others_served(served):
    """A corrupt bank and one for a missing device: one plain line each at start, named in JSON, the others served."""
    c = served["client"]
    log = _log(served)
    for product in served["unservable"]:
        lines = [line for line in log.splitlines() if line.startswith(f"ocbank: error: bank {product!r} is not served: ")]
        assert len(lines) == 1, (product, log[-3000:])
    assert "checksum" in log and ("gpu_only" not in served["unservable"] or "sees no CUDA GPU" in log)
    assert "ocbank serve: 3 bank(s) on" in log
    for noise in ("\x1b[", "Traceback", "ray::", "Connecting to existing Serve app", "Token authentication"):
        assert noise not in log, (noise, log[-3000:])
    status, body, _ = c.get("/readyz")
    assert status == 200 and sorted(body["failed"]) == sorted(served["unservable"])
    listing = c.get("/v1/banks")[1]
    assert sorted(listing["failed"]) == sorted(served["unservable"]) and sorted(listing["banks"]) == ["dots", "probe", "weave"]
    body = _test_images(served, 1)[0].read_bytes()
    for product in served["unservable"]:
        status, answer, _ = c.inspect(product, body)
        assert status == 503 and answer["error"]["code"] == "bank_unavailable", answer
        message = answer["error"]["message"]
        assert message == f"bank {product!r} failed to load: {listing['failed'][product]}"
        assert "\x1b[" not in message and "Traceback" not in message and "ray::" not in message and "\n" not in message


def test_hot_reload_under_load(served):
    """Reload under load: nothing fails, the probe's score moves old -> new and never back; a corrupt file -> 409."""
    from ocbank.model.detector import Detector

    c = served["client"]
    probe = _test_images(served, 1)[0]
    body = probe.read_bytes()
    banks, spare = served["banks"], served["spare"]
    old = float(Detector.load(banks / "probe.h5").predict([str(probe)]).scores[0])
    new = float(Detector.load(spare / "probe_new.h5").predict([str(probe)]).scores[0])
    assert abs(old - new) > 0.5
    stop = threading.Event()
    seen: list[list[tuple[float, float, int, float]]] = [[] for _ in range(3)]

    def load(i: int) -> None:
        deadline = time.monotonic() + 90
        for _ in range(400):  # bounded in count and time
            if stop.is_set() or time.monotonic() > deadline:
                return
            sent = time.monotonic()
            status, answer, _ = c.inspect("probe", body)
            seen[i].append((sent, time.monotonic(), status, answer.get("score", float("nan"))))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    tmp = banks / ".probe.h5.tmp"
    shutil.copy(spare / "probe_new.h5", tmp)
    os.replace(tmp, banks / "probe.h5")
    status, answer, _ = c.call("POST", "/v1/banks/probe/reload")
    reloaded_at = time.monotonic()
    assert status == 200 and answer["changed"] is True, answer
    time.sleep(1.5)
    corrupt = bytearray((banks / "probe.h5").read_bytes())
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = b"\x00" * 64
    (banks / "probe.h5").write_bytes(bytes(corrupt))
    status, rejected, _ = c.call("POST", "/v1/banks/probe/reload")
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert status == 409 and rejected["error"]["code"] == "bank_rejected", rejected
    assert "unchanged" in rejected["error"]["message"]
    status, after, _ = c.inspect("probe", body)
    assert status == 200 and after["score"] == pytest.approx(new, abs=1e-3) and after["bank_sha256"] == answer["bank_sha256"]
    status, listing, _ = c.get("/v1/banks")
    assert listing["banks"]["probe"]["bank_sha256"] == answer["bank_sha256"]

    tol = 1e-3
    for rows in seen:
        assert rows and all(s == 200 for _, _, s, _ in rows), rows
        kinds = []
        for sent, _, _, score in rows:
            kind = "old" if abs(score - old) < tol else "new" if abs(score - new) < tol else "other"
            assert kind != "other", (score, old, new)
            kinds.append(kind)
            if sent > reloaded_at:
                assert kind == "new"  # after the reload answered, only the new bank
        first_new = kinds.index("new") if "new" in kinds else len(kinds)
        assert kinds[first_new:] == ["new"] * (len(kinds) - first_new), kinds  # never back
        assert "old" in kinds and "new" in kinds
    (banks / "probe.h5").write_bytes((spare / "probe_new.h5").read_bytes())


# ---------------------------------------------------------------------- hostile clients
def _serve_cmd(banks: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "ocbank.cli", "serve", "--banks", str(banks), "--port", str(port),
            "--runtime", "torch", "--cpus", "2"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _end_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process it started (a test that failed must not leave a Ray behind)."""
    children = tree(proc.pid)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    for p in children:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _ingress_pids(served) -> dict[str, int]:
    """The processes a request body passes through: Serve's HTTP proxy and the ingress replica."""
    found = {}
    for p in tree(served["proc"].pid):
        with contextlib.suppress(psutil.Error):
            line = " ".join(p.cmdline())
            for name in ("ProxyActor", "ServeReplica:ocbank:Api"):
                if name in line:
                    found[name] = p.pid
    assert len(found) == 2, found
    return found


class PeakMemory:
    """Resident memory of some processes, sampled every 50 ms in a thread: the peak above the start."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start = {name: p.memory_info().rss for name, p in self.procs.items()}
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for name, p in self.procs.items():
                with contextlib.suppress(psutil.Error):
                    self.peak[name] = max(self.peak[name], p.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def grown(self) -> dict[str, int]:
        return {name: self.peak[name] - self.start[name] for name in self.procs}


def _requests_by_status(served) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in served["client"].get("/metrics")[1].splitlines():
        if line.startswith("ocbank_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_a_second_server_on_the_port_is_refused_at_once(served, tmp_path):
    """``ocbank serve`` on a port in use: one line, exit 2, before Ray starts; the proxy's bind is exclusive."""
    port = served["client"].port
    proc = subprocess.Popen(_serve_cmd(served["banks"], port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=REPO)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        _end_tree(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, out, err)
    assert lines[0].startswith("ocbank: error: port") and "already in use" in lines[0] and "Traceback" not in err
    # Not even a server that shares ports (SO_REUSEPORT, as Ray's proxy asks for) can bind it.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError, match="in use"):
            sock.bind(("127.0.0.1", port))


STALLED = 90


def test_stalled_uploads_get_408_and_starve_no_complete_request(served):
    """90 uploads stall after 100 bytes (X-Timeout-Ms 2000): complete requests are answered meanwhile, the stalled
    ones get 408 near their deadline, and the ingress's memory stays flat."""
    c = served["client"]
    body = _test_images(served, 1)[0].read_bytes()
    before = _requests_by_status(served)
    head = (b"POST /v1/inspect/weave HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
            b"X-Timeout-Ms: 2000\r\n\r\n" + b"\x89PNG" + bytes(96))
    stalled: list[socket.socket] = []
    try:
        with PeakMemory(_ingress_pids(served)) as memory:
            opened = time.monotonic()
            for _ in range(STALLED):
                sock = socket.create_connection(("127.0.0.1", c.port), timeout=30)
                sock.sendall(head)
                stalled.append(sock)
            answers = [c.inspect("weave", body) for _ in range(6)]  # while every upload hangs
            replies = []
            deadline = time.monotonic() + 60  # for every reply together
            for sock in stalled:
                raw = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in raw:
                        sock.settimeout(max(0.01, deadline - time.monotonic()))
                        part = sock.recv(4096)
                        if not part:
                            break
                        raw += part
                replies.append((raw.split(b"\r\n", 1)[0], time.monotonic() - opened))
    finally:
        for sock in stalled:
            sock.close()
    assert [s for s, _, _ in answers] == [200] * 6, answers
    assert max(t for _, _, t in answers) < 10.0, [t for _, _, t in answers]
    assert {line for line, _ in replies} == {b"HTTP/1.1 408 Request Timeout"}, replies[:3]
    assert max(t for _, t in replies) < 20.0  # the 2 s deadline, and a loaded machine's slack
    after = _requests_by_status(served)
    assert after.get("408", 0) - before.get("408", 0) == STALLED
    grown = memory.grown()
    assert sum(grown.values()) < 100 << 20, grown  # 100 bytes each: nothing close to their declared size


def test_a_chunked_upload_over_the_limit_is_refused_while_it_streams(served):
    """A 256 MB chunked body (no Content-Length): 413 once 64 MB came, while the client still sends; memory bounded."""
    from ocbank.serve.options import MAX_BODY_BYTES

    total_mb = 256
    chunk = bytes(1 << 20)
    with PeakMemory(_ingress_pids(served)) as memory, socket.create_connection(
            ("127.0.0.1", served["client"].port), timeout=60) as sock:
        sock.sendall(b"POST /v1/inspect/weave HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent, answer = 0, b""
        for _ in range(total_mb):  # bounded: the whole body at most
            if select.select([sock], [], [], 0)[0]:
                break  # the answer came while the body was still being sent
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += 1
        else:
            sock.sendall(b"0\r\n\r\n")
        while b"}" not in answer:  # the JSON error is small: its last brace ends it
            part = sock.recv(65536)
            if not part:
                break
            answer += part
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"too_large"' in answer
    assert sent < total_mb, sent  # refused mid-stream, not after the whole body
    grown = memory.grown()
    # The ingress holds at most the limit's worth (and Serve's buffers); reading all 256 MB would hold twice that.
    assert grown["ServeReplica:ocbank:Api"] < 3 * MAX_BODY_BYTES, grown
    assert grown["ProxyActor"] < 2 * MAX_BODY_BYTES, grown


def test_a_client_that_hangs_up_is_counted_apart_from_errors(served):
    """Clients that hang up mid-upload: counted 499 in /metrics, never 500."""
    c = served["client"]
    before = _requests_by_status(served)
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", c.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/inspect/weave HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
                         + bytes(100))
            time.sleep(0.3)  # the ingress is reading the body
    deadline = time.monotonic() + 30
    after = before
    while time.monotonic() < deadline and after.get("499", 0) - before.get("499", 0) < 4:
        time.sleep(0.5)
        after = _requests_by_status(served)
    assert after.get("499", 0) - before.get("499", 0) == 4, (before, after)
    assert after.get("500", 0) == before.get("500", 0), (before, after)


def _api_routes(router, prefix: str = ""):
    """(path, APIRoute) of every route under ``router``, into included routers (FastAPI >= 0.137 keeps them whole)."""
    from fastapi.routing import APIRoute

    for route in router.routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route
        elif hasattr(route, "original_router"):
            inner = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            yield from _api_routes(route.original_router, prefix + inner)


HOSTILE_NAMES = ["a" * 300, "é" * 130, "\x00", "..", ".", "a/b", "weave.partial", " ", "x" * 4000, "weave\n", "%"]


def test_every_route_answers_json_to_hostile_names(served):
    """Every route of the API, each of its methods, each hostile name in each path parameter: JSON, never a 500."""
    from urllib.parse import quote

    from ocbank.serve import oip
    from ocbank.serve.app import api

    c = served["client"]
    seen = []
    for template, route in _api_routes(api):
        names = HOSTILE_NAMES if route.param_convertors else [""]
        paths = [re.sub(r"\{\w+(:\w+)?\}", quote(n, safe=""), template) for n in names]
        if route.param_convertors:
            paths.append(re.sub(r"\{\w+(:\w+)?\}", "%ff", template))  # not UTF-8
        for method in sorted(route.methods - {"HEAD"}):
            for path in paths:
                status, answer, _ = c.call(method, path, b"not an image" if method == "POST" else None)
                seen.append((method, template, status))
                assert status != 500, (method, path[:80], answer)
                if template == "/metrics" and status == 200:
                    continue  # Prometheus text, by design
                assert isinstance(answer, dict), (method, path[:80], status, answer)
                if status >= 400 and oip.is_v2(template):
                    assert isinstance(answer["error"], str) and answer["error"], answer  # the v2 protocol's shape
                elif status >= 400:
                    assert set(answer["error"]) == {"code", "message"}, answer
                    if route.param_convertors and status == 404:
                        assert answer["error"]["code"] in ("unknown_product", "not_found"), answer
    assert {r for _, r, _ in seen} >= {"/v1/inspect/{product}", "/v1/banks/{product}/reload", "/healthz"}
    reloads = [s for m, r, s in seen if r == "/v1/banks/{product}/reload" and m == "POST"]
    assert reloads and set(reloads) <= {404}, reloads  # a name that cannot be a file is no product


def test_sigkill_of_a_replica_recovers(served):
    """SIGKILL the model replica: requests succeed again within 30 s (on a new replica process)."""
    c = served["client"]
    body = _test_images(served, 1)[0].read_bytes()
    (pid,) = _replica_pids(served["proc"].pid)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    recovered = None
    statuses = []
    while time.monotonic() - killed < 30:
        status, answer, _ = c.inspect("weave", body, headers={"X-Timeout-Ms": "10000"})
        statuses.append(status)
        if status == 200:
            recovered = time.monotonic() - killed
            break
        assert isinstance(answer, dict) and "error" in answer, answer  # failures are JSON too
        time.sleep(0.5)
    assert recovered is not None and recovered < 30, statuses
    assert _replica_pids(served["proc"].pid) - {pid}


def test_sigterm_finishes_in_flight_and_leaves_nothing(served):
    """SIGTERM: requests in flight finish, the server exits (143, the CLI's SIGTERM status) within 30 s, no child left."""
    c = served["client"]
    proc = served["proc"]
    children = tree(proc.pid)
    assert children
    body = _test_images(served, 1)[0].read_bytes()
    results: list[tuple[int, float]] = []
    started = threading.Barrier(13)

    def one() -> None:
        started.wait(timeout=30)
        try:
            status, _, _ = c.inspect("weave", body)
        except (OSError, http.client.HTTPException):
            status = -1
        results.append((status, time.monotonic()))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    started.wait(timeout=30)
    time.sleep(0.05)  # the requests are on their way
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    for t in threads:
        t.join(timeout=60)
    code = proc.wait(timeout=60)
    exited = time.monotonic() - signalled
    assert code == 143 and exited < 30, (code, exited)
    statuses = [s for s, _ in results]
    assert len(statuses) == 12 and set(statuses) <= {200, 503}, statuses  # answered: done, or refused
    assert any(s == 200 and t > signalled for s, t in results), results  # some finished after the signal
    time.sleep(1.0)
    alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_sigterm_during_start_up_exits_143_and_leaves_nothing(served):
    """SIGTERM once Ray runs and before the banks are loaded (Serve's controller is up): 143, no traceback, no child."""
    proc = subprocess.Popen(_serve_cmd(served["banks"], free_port()), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + START_S
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and proc.poll() is None:
            children = tree(proc.pid)
            names = []
            for p in children:
                with contextlib.suppress(psutil.Error):
                    names.append(" ".join(p.cmdline()))
            if any("ServeController" in n for n in names):
                break
            time.sleep(0.1)
        assert proc.poll() is None and children, "Serve's controller never started"
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        exited = time.monotonic() - signalled
    finally:
        _end_tree(proc)
    assert proc.returncode == 143 and exited < 60, (proc.returncode, exited, out[-3000:])
    assert "stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]
    time.sleep(1.0)
    alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_serve_on_a_device_this_machine_lacks_exits_2_with_one_line(tmp_path):
    """``serve --device cuda`` without CUDA: exit 2 within the start-up time, one ``ocbank: error:`` line, nothing else."""
    from ocbank.engine import cuda_available

    if cuda_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "a.h5").write_bytes(b"a bank is not read before the device is checked")
    cmd = [sys.executable, "-m", "ocbank.cli", "serve", "--banks", str(tmp_path), "--port", str(free_port()),
           "--device", "cuda"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=START_S, check=False)
    assert done.returncode == 2 and time.monotonic() - began < START_S, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocbank: error: ") and "no CUDA GPU" in lines[0], done.stderr
    assert done.stdout == "" and "\x1b[" not in done.stderr
