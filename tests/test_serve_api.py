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
    assert info.describe()["n_centroids"] == 5  # the key build, evaluate and update write
    assert info.describe()["bank_sha256"] == info.sha256 and "sha256" not in info.describe()  # as /v1/inspect says
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
        assert served.describe()["bank_sha256"] == info.sha256 and "sha256" not in served.describe()
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
    """onnx_refusal asks the bank (ClusterBank.uses_ivf), the rule its search follows."""
    from ocbank.engine.bank import ClusterBank
    from ocbank.model.detector import Detector
    from ocbank.serve.runtime import onnx_refusal

    x = np.random.default_rng(0).normal(size=(50, 1536)).astype(np.float32)
    for index, approximate in (("ivf", True), ("flat", False), ("auto", False)):  # auto: IVF only for large banks
        det = Detector(weights="none", device="cpu")
        det.bank_ = ClusterBank(1536, 1.0, search_index=index).add(x)
        assert det.bank_.uses_ivf is approximate
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
    assert (err.value.status, err.value.code) == (408, "timeout") and err.value.headers() == {"Connection": "close"}
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


# ---------------------------------------------------------------------- plain errors, forms, the v2 protocol
def test_plain_error_gives_ocbanks_message_from_rays_wrapping():
    """A replica's error reaches the ingress wrapped by Ray (traceback, ANSI colours): one line, ocbank's message."""
    from ocbank.errors import DeviceError
    from ocbank.serve.api import plain_error

    cause = DeviceError("device='cuda' was requested, but torch sees no CUDA GPU. Use device='cpu'.")
    coloured = "\x1b[36mray::ServeReplica:ocbank:Scorer.handle_request()\x1b[39m (pid=1)\n  File \"x.py\", line 1"
    exceptions = pytest.importorskip("ray.exceptions")
    wrapped = exceptions.RayTaskError("handle_request", coloured, cause)
    for exc in (wrapped, wrapped.as_instanceof_cause(), exceptions.RayTaskError("outer", coloured, wrapped)):
        assert plain_error(exc) == str(cause)
    died = exceptions.ActorDiedError()  # no cause: its own message, one line, named by its type
    text = plain_error(died)
    assert text.startswith("ActorDiedError: ") and "\n" not in text
    assert plain_error(RuntimeError("\x1b[31mred\x1b[0m\n  text"), limit=30) == "RuntimeError: red text"
    assert len(plain_error(ValueError("x" * 1000), limit=50)) == 50


def _form(files: dict, data: dict | None = None) -> tuple[bytes, str]:
    requests = pytest.importorskip("requests")
    prepared = requests.Request("POST", "http://localhost/", files=files, data=data).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def test_a_form_upload_is_read_like_the_raw_body(rgb):
    """multipart/form-data with one file: the same pixels as the raw body; any other form is a 400 naming why."""
    pytest.importorskip("python_multipart")
    png = _encode(rgb)
    body, content_type = _form({"file": ("part.png", png, "image/png")})
    assert np.array_equal(decode_image(body, T, 1 << 24, content_type), decode_image(png, T, 1 << 24))
    no_name, content_type_2 = _form({"file": ("", png)})
    assert np.array_equal(decode_image(no_name, T, 1 << 24, content_type_2), decode_image(png, T, 1 << 24))
    bad = {
        "two files": _form({"a": ("a.png", png), "b": ("b.png", png)}),
        "a field beside the file": _form({"file": ("p.png", png)}, {"mask": "png"}),
        "truncated": (body[:-40], content_type),
        "no boundary": (body, "multipart/form-data"),
        "not a form": (b"garbage" * 10, content_type),
    }
    for name, (data, kind) in bad.items():
        with pytest.raises(ApiError) as err:
            decode_image(data, T, 1 << 24, kind)
        assert (err.value.status, err.value.code) == (400, "bad_form"), name
        assert "\n" not in err.value.message, name
    assert "['mask', 'file']" in _message(bad["a field beside the file"])
    with pytest.raises(ApiError) as err:  # bounded like a raw body: the whole form counts
        decode_image(body, T, len(body) - 1, content_type)
    assert err.value.code == "too_large"
    empty, content_type_3 = _form({"file": ("p.png", b"")})
    with pytest.raises(ApiError) as err:  # an empty file in the form
        decode_image(empty, T, 1 << 24, content_type_3)
    assert err.value.code == "empty_body"
    with pytest.raises(ApiError) as err:  # not an image: the message names both ways to send one
        decode_image(b"this is text, not an image" * 4, T, 1 << 24)
    assert err.value.status == 415 and "--data-binary" in err.value.message and "-F file=@" in err.value.message


def _message(case: tuple[bytes, str]) -> str:
    with pytest.raises(ApiError) as err:
        decode_image(case[0], T, 1 << 24, case[1])
    return err.value.message


def _codes_in_source() -> dict[str, set[str]]:
    """Every error code the service can send, read from its source: ApiError(status, "code", ...) calls,
    error_body("code", ...) calls, and the codes Starlette's own errors are given (HTTP_CODES, HTTP_ERROR)."""
    import ast

    from ocbank.serve.api import HTTP_CODES, HTTP_ERROR

    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "ocbank" / "serve").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            index = {"ApiError": 1, "error_body": 0}.get(name)
            if index is None or len(node.args) <= index:
                continue
            arg = node.args[index]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.setdefault(arg.value, set()).add(path.name)
            else:
                assert path.name == "app.py" or name == "error_body", (path, ast.dump(arg))
    for code in (*HTTP_CODES.values(), HTTP_ERROR):
        found.setdefault(code, set()).add("api.py")
    return found


def test_every_error_code_the_service_sends_is_in_the_docs_table():
    """docs/serving.md's error table lists exactly the codes the code can send."""
    import re

    codes = _codes_in_source()
    assert {"bank_unavailable", "method_not_allowed", "not_an_image", "bad_form", "timeout"} <= set(codes)
    text = (REPO / "docs" / "serving.md").read_text()
    table = text.split("### Errors", 1)[1].split("\n\n", 2)[1].splitlines()
    assert table[1].startswith("|---"), table[:2]
    documented = set(re.findall(r"`([a-z_]+)`", " ".join(row.split("|")[2] for row in table[2:])))
    assert set(codes) - documented == set(), f"codes sent but not documented: {sorted(set(codes) - documented)}"
    assert documented - set(codes) == set(), f"codes documented but never sent: {sorted(documented - set(codes))}"


def _v2_bank(calibrated: bool = True):
    from ocbank.serve.banks import BankInfo

    decision = {"image_threshold": 2.0, "pixel_threshold": 1.0} if calibrated else None
    return BankInfo("weave", "weave.h5", "ab" * 32, 5, 1536, 1.0, 72, 64, 64, decision)


def _triton_request(images: list[bytes], outputs: list | None = None, binary: bool = True, request_id: str = "r-1"):
    """What tritonclient.http sends for ``images``: (body, Inference-Header-Content-Length or None)."""
    th = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    tensor = th.InferInput("image", [len(images)], "BYTES")
    import base64

    values = images if binary else [base64.b64encode(b) for b in images]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    body, header_length = _get_inference_request(
        inputs=[tensor], request_id=request_id, outputs=outputs, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, custom_parameters=None)
    return body, None if header_length is None else str(header_length)


def test_v2_requests_and_responses_round_trip_through_tritonclient(rgb):
    """tritonclient's own request encoder and response decoder (binary and JSON) against ocbank.serve.oip."""
    th = pytest.importorskip("tritonclient.http")
    from ocbank.serve import oip
    from ocbank.serve.api import mask_png

    info = _v2_bank()
    pngs = [_encode(rgb), _encode(rgb[::-1])]
    mask = np.zeros((64, 64), bool)
    mask[3:9, 20:41] = True
    rows = [{"score": 1.5, "normalized": 0.75, "threshold": 2.0, "label": "OK", "mask": mask_png(mask)},
            {"score": 3.25, "normalized": 1.625, "threshold": 2.0, "label": "NG", "mask": mask_png(~mask)}]
    for binary in (True, False):
        outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("score", "label", "threshold", "mask")]
        body, header_length = _triton_request(pngs, outputs, binary=binary)
        parsed = oip.parse_infer(body, header_length, info, max_images=8)
        assert parsed.images == pngs and parsed.id == "r-1" and parsed.wants("mask")
        content, headers = oip.infer_response(info, parsed, rows)
        length = headers.get(oip.HEADER_LENGTH)
        result = th.InferResult.from_response_body(content, header_length=None if length is None else int(length))
        assert (length is not None) is binary
        assert result.get_response()["id"] == "r-1" and result.get_response()["model_version"] == info.sha256
        np.testing.assert_array_equal(result.as_numpy("score"), [1.5, 3.25])
        np.testing.assert_array_equal(result.as_numpy("threshold"), [2.0, 2.0])
        assert [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")] == ["OK", "NG"]
        masks = result.as_numpy("mask")
        assert masks.shape == (2, 64, 64) and np.array_equal(masks[0], mask) and np.array_equal(masks[1], ~mask)
    body, header_length = _triton_request(pngs, None)  # no outputs named: the defaults, all binary
    parsed = oip.parse_infer(body, header_length, info, max_images=8)
    assert parsed.outputs == [("score", True), ("normalized", True), ("threshold", True), ("label", True)]
    meta = oip.model_metadata(info)
    assert meta["versions"] == [info.sha256] and meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["mask"] == [-1, 64, 64]
    uncalibrated = _v2_bank(calibrated=False)
    assert [o["name"] for o in oip.model_metadata(uncalibrated)["outputs"]] == ["score"]


def test_v2_bad_requests_are_named(rgb):
    """Each malformed inference request is a 400 whose one-line message names what is wrong."""
    th = pytest.importorskip("tritonclient.http")
    from ocbank.serve import oip

    info = _v2_bank()
    png = _encode(rgb)
    body, length = _triton_request([png])
    header = json.loads(body[: int(length)])

    def refused(data: bytes, header_length: str | None, words: str, bank=info) -> None:
        with pytest.raises(ApiError) as err:
            oip.parse_infer(data, header_length, bank, max_images=4)
        assert err.value.status == 400 and words in err.value.message and "\n" not in err.value.message

    def with_header(edit: dict) -> bytes:
        return json.dumps({**header, **edit}).encode()

    binary = body[int(length):]
    refused(body, str(len(body) + 1), "Inference-Header-Content-Length")
    refused(body[:-3], length, "binary_data_size")
    refused(body + b"xx", length, "binary_data_size")
    refused(body, None, "not JSON")
    refused(b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [NaN]}]}', None, "NaN")
    refused(b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}', None, "base64")
    renamed = with_header({"inputs": [{**header["inputs"][0], "name": "INPUT0"}]})
    refused(renamed + binary, str(len(renamed)), "'image'")
    five = _triton_request([png] * 5)
    refused(five[0], five[1], "1 to 4")
    short = struct_len(binary, 1)
    refused(body[: int(length)] + short, length, "element 0 of input 'image' declares")
    unknown = _triton_request([png], [th.InferRequestedOutput("heatmap")])
    refused(*unknown, "no output 'heatmap'")
    label = _triton_request([png], [th.InferRequestedOutput("label")])
    refused(*label, "no calibrated thresholds", bank=_v2_bank(calibrated=False))
    with pytest.raises(ApiError) as err:
        oip.check_version(info, "1")
    assert err.value.status == 404 and info.sha256 in err.value.message
    oip.check_version(info, info.sha256)


def struct_len(binary: bytes, extra: int) -> bytes:
    """``binary`` with its first element's declared length raised by ``extra`` (more than follows)."""
    import struct

    (n,) = struct.unpack_from("<I", binary)
    return struct.pack("<I", n + extra) + binary[4:]


def test_server_start_stops_everything_and_names_each_bank_when_none_can_be_served(tmp_path):
    """No bank loads: ServeError names each bank and why, and Serve (and the Ray it started) is stopped first."""
    from ocbank.errors import ServeError

    (tmp_path / "a.h5").write_bytes(b"x")
    calls: list[str] = []

    class Handle:
        class warm:  # noqa: N801 - Serve's handle method
            @staticmethod
            def remote():
                return type("R", (), {"result": staticmethod(lambda timeout_s: {
                    "banks": [], "ready": False, "failed": {"a": "device='cuda' was requested", "b": "checksum mismatch"}})})

        class drain:  # noqa: N801
            @staticmethod
            def remote(_s):
                calls.append("drain")
                return type("R", (), {"result": staticmethod(lambda timeout_s: 0)})

    class Serve:
        def start(self, **_kw):
            calls.append("start")

        def run(self, *_a, **_kw):
            return Handle()

        def delete(self, _name):
            calls.append("delete")

    class Ray:
        def is_initialized(self):
            return True

    server = srv.Server.__new__(srv.Server)
    server.__init__ = None
    server.options, server._ray, server._serve = ServeOptions(banks=str(tmp_path)), Ray(), Serve()
    server._temp, server._own_ray, server._connected, server.handle, server.warm = None, False, False, None, {}
    with pytest.raises(ServeError) as err:
        server.start()
    message = str(err.value)
    assert "bank 'a': device='cuda' was requested" in message and "bank 'b': checksum mismatch" in message
    assert calls == ["start", "drain", "delete"] and server.handle is None
    assert srv.not_served({"b": "why b", "a": "why a"}) == [
        "ocbank: error: bank 'a' is not served: why a", "ocbank: error: bank 'b' is not served: why b"]
