"""The serving contract without a server: decoding and its error codes, bank validation, options, metrics, CLI, image.

Fast (no Ray): the end-to-end tests over HTTP are in test_serve.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ocbank.data.images import MAX_IMAGE_PIXELS, Transform, open_image
from ocbank.engine.checkpoint import BankState, write_bank
from ocbank.errors import CheckpointError, ConfigError, DataError
from ocbank.serve import server as srv
from ocbank.serve.api import ApiError, check_length, decode_image, grid_map, query_flags, request_timeout
from ocbank.serve.banks import list_banks, validate_bank
from ocbank.serve.options import ServeOptions

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
T = Transform(72, 64)


def _encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _code(body: bytes, max_bytes: int = 1 << 20) -> tuple[int, str]:
    with pytest.raises(ApiError) as err:
        decode_image(body, T, max_bytes)
    return err.value.status, err.value.code


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (90, 100, 3), dtype=np.uint8)


def test_bytes_are_read_like_files(tmp_path, rgb):
    """The request body goes through predict's reader: same pixels as the file, for 8- and 16-bit PNG and EXIF."""
    gray16 = (rgb[..., 0].astype(np.uint16) * 257 + 77).astype(np.uint16)
    cases = {"rgb.png": _encode(rgb), "g16.png": _encode(gray16), "rgb.tif": _encode(rgb, "TIFF")}
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", exif=exif, quality=95)
    cases["exif.jpg"] = buf.getvalue()
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        from_file = np.asarray(open_image(path))
        from_bytes = np.asarray(open_image(data))
        assert np.array_equal(from_file, from_bytes), name
        pixels = decode_image(data, T, 1 << 24)
        assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
        assert np.array_equal(pixels, T.image(open_image(path))[1]), name
    assert np.asarray(open_image(cases["exif.jpg"])).shape[:2] == (100, 90)  # EXIF applied


def test_each_bad_body_has_its_code(rgb):
    jpeg = _encode(rgb, "JPEG")
    assert _code(b"") == (400, "empty_body")
    assert _code(jpeg[: len(jpeg) // 2]) == (400, "undecodable")
    assert _code(b"%PDF-1.4 not an image" * 10) == (415, "not_an_image")
    assert _code(_encode(rgb), max_bytes=100) == (413, "too_large")
    side = int(MAX_IMAGE_PIXELS**0.5) + 8
    big = Image.new("1", (side, side))  # 1-bit: a small file declaring too many pixels
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    assert _code(buf.getvalue(), max_bytes=1 << 26) == (413, "too_large")
    with pytest.raises(ApiError) as err:
        check_length("999999999", 1000)
    assert err.value.status == 413


def test_headers_and_query_flags():
    assert request_timeout(None, 5.0) == 5.0
    assert request_timeout("250", 5.0) == pytest.approx(0.25)
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(ApiError) as err:
            request_timeout(bad, 5.0)
        assert err.value.status == 400 and "X-Timeout-Ms" in err.value.message
    assert query_flags("png", "1") == (True, True)
    assert query_flags(None, None) == (False, False)
    with pytest.raises(ApiError):
        query_flags("jpeg", None)
    with pytest.raises(ApiError):
        query_flags(None, "yes")


def test_grid_map_is_the_mean_of_each_cell():
    amap = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    grid = np.asarray(grid_map(amap, 8))
    assert grid.shape == (8, 8)
    assert grid[2, 3] == pytest.approx(amap[16:24, 24:32].mean())


def _bank(path: Path, tmp_path: Path, dim: int = 1536, grid: list[int] | None = None, **extra) -> bytes:
    rng = np.random.default_rng(1)
    meta = {"config": tiny_config(tmp_path), "feature_grid": grid or [8, 8],
            "decision": {"image_threshold": 3.0, "pixel_threshold": 2.5, "false_alarm_rate": 0.01}, **extra}
    state = BankState(rng.standard_normal((5, dim)).astype(np.float32), np.ones(5, np.int64), 1.5, dim, 5, meta)
    write_bank(path, state)
    return path.read_bytes()


def test_validate_bank_accepts_a_bank_and_refuses_the_rest(tmp_path):
    data = _bank(tmp_path / "a.h5", tmp_path)
    info = validate_bank("a", data, "a.h5")
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.model_id == f"a@{info.sha256}"
    assert (info.n_centroids, info.dim, info.image_size, info.crop, info.resize) == (5, 1536, 64, 64, 72)
    assert info.describe()["thresholds"]["image_threshold"] == 3.0
    damaged = bytearray(data)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 32] = b"\xff" * 32
    for bad in (bytes(damaged), data[: len(data) // 3], b"not a bank"):
        with pytest.raises(CheckpointError):
            validate_bank("a", bad, "a.h5")
    with pytest.raises(CheckpointError, match="1536"):
        validate_bank("b", _bank(tmp_path / "b.h5", tmp_path, dim=8), "b.h5")
    with pytest.raises(CheckpointError, match="feature grid"):
        validate_bank("c", _bank(tmp_path / "c.h5", tmp_path, grid=[7, 7]), "c.h5")
    with pytest.raises(CheckpointError, match="unfinished build checkpoint"):
        validate_bank("d", _bank(tmp_path / "d.h5", tmp_path, complete=False), "d.h5")
    with pytest.raises(CheckpointError, match="image_threshold"):
        validate_bank("e", _bank(tmp_path / "e.h5", tmp_path, decision={"image_threshold": -1, "pixel_threshold": 1}),
                      "e.h5")


def test_list_banks_serves_finished_banks_only(tmp_path, caplog):
    with pytest.raises(DataError):
        list_banks(tmp_path)
    for name in ("a.h5", "_all_classes.h5", "b.partial.h5", ".hidden.h5", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.h5").mkdir()
    with caplog.at_level("WARNING", logger="ocbank.serve.banks"):
        assert list(list_banks(tmp_path)) == ["_all_classes", "a"]  # class names, as config.check_class_name says
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 3 and all(m.startswith("not serving ") for m in skipped), skipped
    for name in ("b.partial.h5", ".hidden.h5", "dir.h5"):
        assert sum(name in m for m in skipped) == 1, (name, skipped)
    with pytest.raises(DataError):
        list_banks(tmp_path / "missing")


def test_options_share_the_cores_out():
    two = ServeOptions(banks="b", cpus=2, batch_wait_ms=0, device="cuda:1")
    assert (two.replica_cpus, two.replica_threads, two.max_ongoing) == (2.0, 2, 16)
    three = ServeOptions(banks="b", cpus=2, replicas=3)
    assert three.replica_cpus * 3 == pytest.approx(2.0) and three.replica_threads == 1
    for bad in ({"replicas": 0}, {"max_batch": 0}, {"runtime": "tensorrt"}, {"batch_wait_ms": -1}, {"cpus": 0},
                {"timeout_s": 0}, {"timeout_s": -1.0}, {"device": "gpu"}, {"device": "cuda:x"}):
        with pytest.raises(ConfigError):
            ServeOptions(banks="b", **bad)


def test_metrics_count_each_model_call_once():
    pytest.importorskip("prometheus_client")
    from ocbank.serve.metrics import Metrics

    m = Metrics(max_batch=8)
    call = {"id": "abc", "size": 3}
    for _ in range(3):  # three requests of one call report it
        m.model_call("weave", call)
        m.request("weave", 200, 0.01)
    m.model_call("weave", {"id": "def", "size": 1})
    text = m.render().decode()
    assert 'ocbank_batch_size_count{product="weave"} 2.0' in text
    assert 'ocbank_batch_size_bucket{le="1.0",product="weave"} 1.0' in text
    assert 'ocbank_requests_total{product="weave",status="200"} 3.0' in text


def test_cli_serve_options():
    from ocbank.cli import build_parser

    args = build_parser().parse_args(["serve", "--banks", "banks"])
    assert (args.host, args.port, args.replicas, args.max_batch, args.batch_wait_ms, args.runtime) == (
        "127.0.0.1", 8000, 1, 8, 10.0, "auto")
    assert args.address is None
    for bad in (["--replicas", "0"], ["--runtime", "tensorrt"], ["--batch-wait-ms", "-3"], ["--timeout-ms", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--banks", "b", *bad])


def test_docker_image_runs_ocbank_serve():
    """docker/Dockerfile.serve (not built in CI): serve extra installed, ocbank serve as the entrypoint."""
    lines = []
    for raw in (REPO / "docker" / "Dockerfile.serve").read_text().replace("\\\n", " ").splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.strip())
    instr = {}
    for line in lines:
        key, _, rest = line.partition(" ")
        instr.setdefault(key.upper(), []).append(rest.strip())
    entry = json.loads(instr["ENTRYPOINT"][-1])
    assert entry[:2] == ["ocbank", "serve"]
    cmd = json.loads(instr["CMD"][-1])
    parser_args = entry[1:] + cmd
    from ocbank.cli import build_parser

    args = build_parser().parse_args(parser_args)
    assert args.func.__name__ == "cmd_serve" and args.host == "0.0.0.0"
    assert any("pip install" in run and "serve" in run for run in instr["RUN"])
    assert str(args.port) in " ".join(instr["EXPOSE"])
    assert "/readyz" in " ".join(instr["HEALTHCHECK"])
    assert "STOPSIGNAL" not in instr or instr["STOPSIGNAL"] == ["SIGTERM"]


@pytest.mark.slow
def test_runtimes_score_like_detector_predict(tmp_path, tiny_mvtec):
    """torch and onnxruntime (the exported graph) give Detector.predict's scores and maps within 1e-4 of the map range."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from ocbank.model.detector import Detector
    from ocbank.serve.runtime import ServedBank, make_runtime, onnx_refusal

    train = sorted((tiny_mvtec / "weave" / "train" / "good").glob("*.png"))
    tests = sorted((tiny_mvtec / "weave" / "test").rglob("*.png"))
    det = Detector(weights="none", image_size=64, resize=72, radius="auto", radius_images=3, device="cpu")
    bank = tmp_path / "weave.h5"
    det.fit(train[:4]).calibrate(train[4:]).save(bank)
    ref = Detector.load(bank).predict([str(p) for p in tests])
    span = float(ref.maps.max() - ref.maps.min())
    pixels = np.stack([T.image(open_image(p))[1] for p in tests])
    info = validate_bank("weave", bank.read_bytes(), str(bank))
    for kind in ("torch", "onnxruntime", "auto"):
        served = ServedBank.load(bank, info.sha256, kind, threads=1, batch=4)
        assert served.runtime.name == ("onnxruntime" if kind == "auto" else kind)  # auto: onnxruntime on CPU
        scores, maps = served.runtime(pixels)
        assert np.abs(scores - ref.scores).max() <= 1e-4 * span, kind
        assert np.abs(maps - ref.maps).max() <= 1e-4 * span, kind
        rows = served.score(pixels, [False] * len(tests), [False] * len(tests))
        assert [r["label"] for r in rows] == ["NG" if x == 1 else "OK" for x in ref.labels]
    shared: dict = {}  # a replica's backbones: the second bank reuses the first one's
    first = ServedBank.load(bank, info.sha256, "torch", threads=1, batch=4, extractors=shared)
    second = ServedBank.load(bank, info.sha256, "torch", threads=1, batch=4, extractors=shared)
    assert len(shared) == 1 and second.detector.extractor is first.detector.extractor
    assert np.abs(second.runtime(pixels)[0] - ref.scores).max() <= 1e-4 * span
    import dataclasses

    local = Detector.load(bank)
    local.config = dataclasses.replace(local.config, scoring=dataclasses.replace(local.config.scoring, mode="local_mean"))
    assert "scoring.mode" in onnx_refusal(local)
    assert make_runtime("auto", local, bank, 1).name == "torch"
    with pytest.raises(ConfigError, match="onnxruntime"):
        make_runtime("onnxruntime", local, bank, 1)


def test_serve_forever_gives_back_the_callers_signal_handlers(tmp_path, monkeypatch):
    class FakeServer:
        warm: dict = {}

        def __init__(self, options):
            pass

        def start(self):
            pass

        def stop(self):
            pass

    def announce(line):
        if "bank(s) on" in line:
            signal.raise_signal(signal.SIGTERM)  # runs the installed handler at once

    def mine(signum, frame):
        raise AssertionError("the caller's handler ran")

    monkeypatch.setattr(srv, "Server", FakeServer)
    monkeypatch.setattr(srv, "list_banks", lambda folder: {"a": tmp_path / "a.h5"})
    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert srv.serve_forever(ServeOptions(banks=str(tmp_path)), announce) == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_served_threshold_is_the_one_that_labelled():
    from types import SimpleNamespace

    from ocbank.model.calibration import Decision
    from ocbank.serve.runtime import ServedBank

    scores, maps = np.array([1.0, 3.0], np.float32), np.zeros((2, 8, 8), np.float32)
    decision = Decision(image_threshold=2.0, pixel_threshold=1.0)
    # The detector's metadata says otherwise: the replica must report its Decision's threshold.
    detector = SimpleNamespace(decision=decision, metadata_={"decision": {"image_threshold": 9.0, "pixel_threshold": 1.0}})
    served = ServedBank(detector, lambda pixels: (scores, maps), "sha")
    rows = served.score(np.zeros((2, 8, 8, 3), np.uint8), [False, False], [False, False])
    assert [(r["threshold"], r["label"], r["normalized"]) for r in rows] == [(2.0, "OK", 0.5), (2.0, "NG", 1.5)]
    uncalibrated = ServedBank(SimpleNamespace(decision=None, metadata_={}), lambda pixels: (scores, maps), "sha")
    assert [r["threshold"] for r in uncalibrated.score(np.zeros((2, 8, 8, 3), np.uint8), [False] * 2, [False] * 2)] == [None, None]


def test_served_crops_take_the_loaders_uint8_to_unit_step():
    from ocbank.data.images import normalize, rgb8_to_unit
    from ocbank.serve.runtime import as_input

    px = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    batch = as_input(px)
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.float32
    np.testing.assert_array_equal(batch.numpy(), px.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))
    loader, rgb = Transform(16, None).image(Image.fromarray(px[1]))  # the loader's tensor for the same crop
    assert np.array_equal(rgb, px[1]) and torch.equal(normalize(batch[1]), loader)
    assert torch.equal(rgb8_to_unit(px), batch)


@pytest.mark.parametrize(("edit", "words"), [({"dim": 8}, "1536"), ({"grid": [7, 7]}, "feature grid"),
                                             ({"decision": {"image_threshold": -1, "pixel_threshold": 1}}, "image_threshold")])
def test_validation_and_the_replicas_load_refuse_a_bank_alike(tmp_path, edit, words):
    from ocbank.errors import OcbankError
    from ocbank.model.detector import Detector

    path = tmp_path / "x.h5"
    data = _bank(path, tmp_path, **edit)
    with pytest.raises(CheckpointError) as served:  # 409 at reload
        validate_bank("x", data, str(path))
    with pytest.raises(OcbankError) as loaded:  # what a replica's Detector.load says
        Detector.load(path, device="cpu")
    assert words in str(served.value) and str(served.value) == str(loaded.value)


def test_a_replica_holds_bank_bytes_only_while_a_request_waits_for_them():
    """Scorer._get: the bytes' reference is there for every load (even after a failed one), and gone after."""
    import asyncio
    from collections import Counter

    pytest.importorskip("ray.serve")
    from ocbank.serve.app import Scorer

    scorer = Scorer.func_or_class.__new__(Scorer.func_or_class)
    scorer._sources, scorer._waiting = {}, Counter()
    seen: list[object] = []

    async def run() -> None:
        first_may_fail = asyncio.Event()

        async def multiplexer(model_id: str) -> str:  # records what the load would read
            seen.append(scorer._sources.get(model_id))
            if len(seen) == 1:
                await first_may_fail.wait()
                raise RuntimeError("load failed")
            return f"bank {model_id}"

        scorer._bank = multiplexer
        first = asyncio.ensure_future(scorer._get("p@1", ["bytes-1"]))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(scorer._get("p@1", ["bytes-1"]))
        await asyncio.sleep(0)
        first_may_fail.set()
        with pytest.raises(RuntimeError, match="load failed"):
            await first
        assert await second == "bank p@1"
        assert await scorer._get("p@2", ["bytes-2"]) == "bank p@2"

    asyncio.run(run())
    assert seen == ["bytes-1", "bytes-1", "bytes-2"]
    assert scorer._sources == {} and not scorer._waiting  # a replaced bank's bytes are not pinned


def test_the_graph_is_refused_exactly_when_the_bank_searches_with_ivf():
    """onnx_refusal asks the bank (ClusterBank.uses_ivf_), the rule its search follows."""
    from ocbank.engine.bank import ClusterBank
    from ocbank.model.detector import Detector
    from ocbank.serve.runtime import onnx_refusal

    x = np.random.default_rng(0).normal(size=(50, 1536)).astype(np.float32)
    for index, approximate in (("ivf", True), ("flat", False), ("auto", False)):  # auto: IVF only for large banks
        det = Detector(weights="none", device="cpu")
        det.bank_ = ClusterBank(1536, 1.0, search_index=index).add(x)
        assert det.bank_.uses_ivf_ is approximate
        assert ("IVF" in (onnx_refusal(det) or "")) is approximate, index


# ---------------------------------------------------------------------- hostile clients, one server per port
def _chunks(sizes: list[int], pulled: list[int], stall_after: int | None = None):
    """An async body of chunks of ``sizes`` bytes, recording each one pulled; it stalls (forever) after ``stall_after``."""
    import asyncio

    async def gen():
        for i, size in enumerate(sizes):
            if stall_after is not None and i == stall_after:
                await asyncio.Event().wait()
            pulled.append(size)
            yield bytes(size)

    return gen()


def test_a_body_is_bounded_in_size_while_it_streams_and_in_time():
    import asyncio
    import time

    from ocbank.serve.api import read_body

    pulled: list[int] = []
    assert asyncio.run(read_body(_chunks([10, 20, 30], pulled), 60, 5.0)) == bytes(60)
    pulled.clear()
    with pytest.raises(ApiError) as err:  # 1000 chunks of 100 bytes, a limit of 250: refused at the third
        asyncio.run(read_body(_chunks([100] * 1000, pulled), 250, 5.0))
    assert (err.value.status, err.value.code) == (413, "too_large") and len(pulled) == 3
    began = time.monotonic()
    with pytest.raises(ApiError) as err:  # a body that stops arriving: 408 at the deadline, the connection closed
        asyncio.run(read_body(_chunks([100] * 10, [], stall_after=2), 10_000, 0.2))
    assert (err.value.status, err.value.code) == (408, "timeout") and err.value.headers == {"Connection": "close"}
    assert 0.2 <= time.monotonic() - began < 5.0


def test_the_proxy_reads_no_body_past_the_limit():
    """BodyCap passes messages on until more than the limit came, then reads nothing more from the client."""
    import asyncio

    from ocbank.serve.proxy import BodyCap

    read: list[int] = []

    async def client():  # a client that would send 1000 messages of 100 bytes
        read.append(100)
        return {"type": "http.request", "body": bytes(100), "more_body": True}

    async def proxy(scope, receive, send):  # reads as fast as it can, as Ray's proxy does
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_drain(receive), 0.5)

    async def _drain(receive):
        for _ in range(1000):
            await receive()

    asyncio.run(BodyCap(proxy, max_bytes=250)({"type": "http"}, client, None))
    assert len(read) == 3  # 300 bytes: past the limit, so the ingress answers 413; nothing more was read


def test_ports_are_checked_at_the_door(tmp_path):
    from ocbank.cli import build_parser
    from ocbank.errors import PortInUseError
    from ocbank.serve.options import check_port_free

    for bad in ("70000", "0", "-1", "http"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--banks", "b", "--port", bad])
    for bad in (70000, 0, True):
        with pytest.raises(ConfigError, match="1 to 65535"):
            ServeOptions(banks="b", port=bad)
    import socket

    with socket.socket() as held:  # any server holding the port, even one that lets others share it
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} .* already in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # free again


def test_names_that_cannot_be_files_are_no_products():
    from ocbank.serve.banks import valid_product

    assert valid_product("weave") and valid_product("a" * 252)  # a.h5 fits in 255 bytes
    for name in ("a" * 253, "é" * 130, "weave.partial", "..", "a/b", "\x00", ""):
        assert not valid_product(name), name


def test_a_sigterm_caught_by_ray_init_goes_to_the_callers_handler():
    """ray.init installs a SIGTERM handler (sys.exit): one arriving inside it reaches the caller's handler."""
    import sys

    class Stopped(Exception):
        pass

    class FakeRay:
        def init(self, **kwargs):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does
            signal.raise_signal(signal.SIGTERM)

    def mine(signum, frame):
        raise Stopped

    server = srv.Server.__new__(srv.Server)
    server._ray = FakeRay()
    before = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(Stopped):
            server._init_ray()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
