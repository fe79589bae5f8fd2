"""The Ray Serve application: an HTTP ingress (FastAPI) in front of one multiplexed, batched model deployment.

- ``Api`` (one replica, no reserved CPU): routes, decoding, errors, metrics, the bank table.
  Bank files are validated here and their bytes put in Ray's object store, so every
  model replica loads exactly the validated bytes, wherever it runs.
- ``Scorer`` (``--replicas`` replicas, the cores shared out): every product's bank, loaded
  on first use per replica and evicted least-recently-used beyond ``max_banks_per_replica``
  (Serve's model multiplexing, keyed ``product@sha256``, so a reload is a new key and no
  replica ever mixes two versions); requests for the same bank are batched (``@serve.batch``,
  which splits batches by key).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time.
import asyncio
import contextlib
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .._version import __version__
from ..engine.threads import set_compute_threads
from ..errors import OcbankError
from . import oip
from .admin import AdminRoutes
from .admin import router as admin_router
from .api import (
    CLIENT_CLOSED,
    HTTP_CODES,
    HTTP_ERROR,
    TIMEOUT_HEADER,
    UNCALIBRATED,
    ApiError,
    check_length,
    decode_image,
    error_body,
    plain_error,
    query_flags,
    read_body,
    request_timeout,
)
from .banks import BankInfo, bank_path, is_bank_file, list_banks, read_bank_bytes, valid_product, validate_bank
from .health import HEALTH_STATES
from .metrics import OTHER_PRODUCT, Metrics
from .options import ServeOptions

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05
# Request bodies (up to 64 MB) are freed after each answer, but glibc's sliding mmap threshold
# keeps such buffers in the heap once one has been freed, so a burst would stay resident.
# A fixed threshold returns every buffer of 1 MB or more to the system when it is freed.
INGRESS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
OVERLOADED = "the inspection queue is full. Retry after a moment, or add replicas (--replicas)."
# Uploads the ingress receives at once besides the requests it holds for scoring. Requests
# still being received take none of the scoring capacity, so slow or stalled uploads cannot
# starve complete ones; each holds its slot at most until its deadline (408).
MAX_RECEIVING = 256


@dataclass(frozen=True)
class ScoreRequest:
    """One decoded image for one bank. ``source`` holds the bank bytes' ObjectRef (in a list, so Ray passes the ref)."""

    model_id: str  # product@sha256 of the bank to score with
    pixels: np.ndarray  # uint8 RGB [S, S, 3]
    source: list[Any]
    want_mask: bool = False
    want_map: bool = False


@dataclass(frozen=True)
class _Entry:
    """A served bank in the ingress: what it is, and where its validated bytes are."""

    info: BankInfo
    ref: Any  # ray.ObjectRef of the file's bytes


def _write_temp(data: bytes, model_id: str) -> str:
    # Named by product and version, so that a warning Detector.load logs about the file names the bank.
    product, sha = model_id.rsplit("@", 1)
    fd, path = tempfile.mkstemp(suffix=".h5", prefix=f"ocbank-serve-{product}@{sha[:12]}-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


@serve.deployment(name="Scorer", health_check_period_s=2, graceful_shutdown_timeout_s=20)
class Scorer:
    """Model replica: banks by ``product@sha256``, scored in dynamic batches."""

    def __init__(self, options: ServeOptions) -> None:
        set_compute_threads(options.replica_threads)  # this replica's share of the cores
        self.options = options
        self._sources: dict[str, Any] = {}  # bank bytes (ObjectRef) while a request for them waits
        self._waiting: Counter[str] = Counter()
        self._extractors: dict[tuple[str, ...], Any] = {}  # one backbone for every bank that uses it

        async def load(model_id: str) -> Any:
            return await self._load(model_id)

        self._bank = serve.multiplexed(max_num_models_per_replica=options.max_banks_per_replica)(load)
        self.score.set_max_batch_size(options.max_batch)
        self.score.set_batch_wait_timeout_s(options.batch_wait_ms / 1000.0)

    async def _load(self, model_id: str) -> Any:
        from .runtime import ServedBank  # noqa: PLC0415

        ref = self._sources.get(model_id)
        if ref is None:
            msg = f"replica has no source for bank {model_id}; reload it."
            raise RuntimeError(msg)
        data = await ref
        sha = model_id.rsplit("@", 1)[1]

        def build() -> ServedBank:
            path = _write_temp(data, model_id)
            try:
                return ServedBank.load(
                    path, sha, self.options.runtime, threads=self.options.replica_threads,
                    batch=self.options.max_batch, device=self.options.device, extractors=self._extractors,
                )
            finally:
                os.unlink(path)

        return await asyncio.to_thread(build)

    async def _get(self, model_id: str, source: list[Any]) -> Any:
        """The loaded bank ``model_id``; its bytes ``source[0]`` are held only while a request waits.

        The multiplexer keeps the loaded bank, so once no request for it is waiting the
        reference goes, and the object store can free a replaced bank's bytes.
        """
        self._sources.setdefault(model_id, source[0])
        self._waiting[model_id] += 1
        try:
            return await self._bank(model_id)
        finally:
            self._waiting[model_id] -= 1
            if not self._waiting[model_id]:
                del self._waiting[model_id], self._sources[model_id]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def score(self, requests: list[ScoreRequest]) -> list[dict[str, Any]]:
        # Serve splits batches by multiplexed model id; grouping here keeps that true on any Ray version.
        out: list[dict[str, Any] | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.model_id, []).append(i)
        for model_id, idx in groups.items():
            part = [requests[i] for i in idx]
            bank = await self._get(model_id, part[0].source)
            pixels = np.stack([r.pixels for r in part])
            rows = await asyncio.to_thread(bank.score, pixels, [r.want_mask for r in part], [r.want_map for r in part])
            call = {"id": uuid.uuid4().hex, "size": len(part)}
            for i, row in zip(idx, rows):
                out[i] = {**row, "call": call}
        return out

    async def prepare(self, model_id: str, source: list[Any]) -> dict[str, Any]:
        """Load (or find) the bank ``model_id`` names; describe it."""
        bank = await self._get(model_id, source)
        return {**bank.describe(), "pid": os.getpid()}


api = FastAPI(title="ocbank", summary="Anomaly inspection with ocbank banks")


def _error_for(request: Request, exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    """``exc`` in the shape of the request's API: ocbank's {code, message}, or the v2 protocol's {"error": message}."""
    body = oip.error_body(exc.message) if oip.is_v2(request.url.path) else exc.body()
    return JSONResponse(body, status_code=exc.status, headers={**exc.headers(), **(headers or {})})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, HTTP_ERROR)
    return _error_for(request, ApiError(exc.status_code, code, str(exc.detail)))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_for(request, ApiError(400, "bad_request", " ".join(str(exc).split())))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Any route's bug: still JSON, never Starlette's plain-text 500; logged with its traceback.
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error_for(request, ApiError(500, "internal", f"internal error ({type(exc).__name__}); see the server log."))


def _error(exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers={**exc.headers(), **(headers or {})})


api.include_router(admin_router)  # feedback, learn, versions, rollback (ocbank.serve.admin)


def _retry_headers(exc: ApiError) -> dict[str, str] | None:
    return {"Retry-After": "1"} if exc.status == 503 else None


@serve.deployment(name="Api", num_replicas=1, graceful_shutdown_timeout_s=30,
                  ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": INGRESS_ENV}})
@serve.ingress(api)
class Api(AdminRoutes):
    """HTTP ingress: the API of docs/serving.md."""

    def __init__(self, scorer: DeploymentHandle, options: ServeOptions) -> None:
        set_compute_threads(1)  # decoding only; the cores are the model replicas'
        self.scorer = scorer
        self.options = options
        self.metrics = Metrics(options.max_batch)
        self.banks: dict[str, _Entry] = {}
        self.failed: dict[str, str] = {}  # product -> why it is not served
        for product, path in list_banks(options.banks).items():
            try:
                self.banks[product] = self._entry(product, read_bank_bytes(path), str(path))
            except (OcbankError, OSError) as exc:
                self.failed[product] = " ".join(str(exc).split())
        self.prepared: set[str] = set()  # model ids loaded once by a replica
        self.draining = False
        self.receiving = 0  # inspections whose body is still arriving
        self.inflight = 0  # inspections between their whole body and their answer
        # What the model replicas hold plus Serve's queue (max_queued_requests): beyond it, 503.
        self.capacity = options.replicas * options.max_ongoing + options.max_queued
        self._warming: asyncio.Future[None] | None = None
        self._reload_lock: asyncio.Lock | None = None
        self.init_admin()

    @staticmethod
    def _entry(product: str, data: bytes, where: str) -> _Entry:
        info = validate_bank(product, data, where)
        return _Entry(info, ray.put(data))

    # ------------------------------------------------------------------ readiness
    async def warm(self) -> dict[str, Any]:
        """Load every bank on a replica once; return {ready, failed}. Idempotent."""
        self._start_warming()
        await asyncio.shield(self._warming)
        return {"ready": self.ready, "banks": sorted(self.banks), "failed": dict(self.failed)}

    async def _warm(self) -> None:
        for product, entry in list(self.banks.items()):
            try:
                await self._prepare(entry)
            except Exception as exc:  # noqa: BLE001 - a bank that cannot load is reported, not fatal
                self.failed[product] = plain_error(exc)  # ocbank's message, not Ray's traceback
                self.banks.pop(product, None)

    async def _prepare(self, entry: _Entry) -> dict[str, Any]:
        handle = self.scorer.options(multiplexed_model_id=entry.info.model_id)
        described = await handle.prepare.remote(entry.info.model_id, [entry.ref])
        self.prepared.add(entry.info.model_id)
        return described

    @property
    def ready(self) -> bool:
        """Every bank that can be served is loaded on a replica (those that cannot are named in ``failed``)."""
        return bool(self.banks) and all(e.info.model_id in self.prepared for e in self.banks.values())

    def not_ready_reason(self) -> str:
        if self.draining:
            return "shutting down"
        if not self.banks:
            return "no bank can be served: " + "; ".join(f"{p}: {m}" for p, m in sorted(self.failed.items()))
        waiting = sorted(p for p, e in self.banks.items() if e.info.model_id not in self.prepared)
        return f"loading banks: {', '.join(waiting)}"

    def _start_warming(self) -> None:
        if self._warming is None:
            self._warming = asyncio.ensure_future(self._warm())

    async def drain(self, timeout_s: float) -> int:
        """Refuse new inspections (503) and wait for the ones in flight; return how many were left."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.inflight + self.receiving and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return self.inflight + self.receiving

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        self._start_warming()
        if self.ready and not self.draining:
            return JSONResponse({"ready": True, "banks": sorted(self.banks), "failed": dict(self.failed)})
        return JSONResponse(error_body("not_ready", self.not_ready_reason()), status_code=503)

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        for product in self.banks:
            self.metrics.health(product, self.health(product)["state"], HEALTH_STATES)
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    @api.get("/v1/banks")
    async def list_served(self) -> dict[str, Any]:
        return {
            "banks": {p: {**e.info.describe(), "calibration": self.health(p)} for p, e in sorted(self.banks.items())},
            "failed": dict(self.failed),
            "ready": self.ready,
        }

    # ------------------------------------------------------------------ reload
    @api.post("/v1/banks/{product}/reload")
    async def reload(self, product: str, request: Request) -> JSONResponse:
        try:
            self.authorize_admin(request, "reload")
            return JSONResponse(await self.reload_and_announce(product, "reloaded"))  # one at a time; inspections go on
        except ApiError as exc:
            return _error(exc)

    async def _reload(self, product: str) -> dict[str, Any]:
        path = bank_path(self.options.banks, product)
        known = product in self.banks or product in self.failed
        if not valid_product(product) or (not known and not is_bank_file(path)):
            raise ApiError(404, "unknown_product", f"no bank {product!r} in {self.options.banks}. Served: {sorted(self.banks)}.")
        try:
            data = await asyncio.to_thread(read_bank_bytes, path)
            info = await asyncio.to_thread(validate_bank, product, data, str(path))
        except (OcbankError, OSError) as exc:
            message = " ".join(str(exc).split()) + " The bank in service is unchanged."
            raise ApiError(409, "bank_rejected", message) from None
        old = self.banks.get(product)
        if old is not None and old.info.sha256 == info.sha256:
            return {"product": product, "bank_sha256": info.sha256, "previous_sha256": info.sha256, "changed": False}
        entry = _Entry(info, ray.put(data))
        try:
            described = await self._prepare(entry)  # a replica loads it before anyone is sent to it
        except Exception as exc:  # noqa: BLE001 - any load failure keeps the old bank
            message = f"{path} passed validation but a replica could not load it: {plain_error(exc, 400)}"
            raise ApiError(409, "bank_rejected", message + " The bank in service is unchanged.") from None
        self.banks[product] = entry  # the swap: requests from now on name the new model id
        self.failed.pop(product, None)
        return {
            "product": product,
            "bank_sha256": info.sha256,
            "previous_sha256": old.info.sha256 if old else None,
            "changed": True,
            "runtime": described.get("runtime"),
        }

    # ------------------------------------------------------------------ inspect
    @api.post("/v1/inspect/{product}")
    async def inspect(self, product: str, request: Request, mask: str | None = None, map: str | None = None) -> Response:  # noqa: A002
        return await self._counted(product, request, lambda began: self._inspect(product, request, mask, map, began))

    async def _counted(self, product: str, request: Request, work: Callable[[float], Awaitable[Response]]) -> Response:
        """Run one inspection (``/v1/inspect`` or v2 ``infer``): counted in the metrics, errors as JSON."""
        began = time.perf_counter()
        label = product if product in self.banks else OTHER_PRODUCT
        status = 500
        try:
            response = await work(began)
            status = 200
            return response
        except ApiError as exc:
            status = exc.status
            return _error_for(request, exc, _retry_headers(exc))
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # Serve cancels a request whose client hung up
            raise
        except Exception as exc:  # a bug in ocbank: still JSON, and logged with its traceback
            log.exception("inspect %s failed", product)
            return _error_for(request, ApiError(500, "internal", f"internal error ({type(exc).__name__}); see the server log."))
        finally:
            self.metrics.request(label, status, time.perf_counter() - began)

    def _admit(self, product: str, request: Request) -> _Entry:
        """The served bank for a new inspection, or the 503 / 401 / 404 that refuses it before its body is read."""
        if self.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down. Send the request to another instance.")
        if self.inflight >= self.capacity:  # shed before the body is read or decoded: the answer comes at once
            raise ApiError(503, "overloaded", OVERLOADED)
        self.authorize_inspect(request)
        return self._served(product)

    async def _body(self, request: Request, began: float, timeout_s: float) -> bytes:
        """The request's body within what is left of its deadline and the size limit (408 / 413).

        Counted as receiving meanwhile, not in flight: an upload still arriving holds none
        of the scoring capacity, so stalled ones cannot starve complete requests.
        """
        check_length(request.headers.get("content-length"), self.options.max_body_bytes)
        self.receiving += 1
        try:
            left = timeout_s - (time.perf_counter() - began)
            return await read_body(request.stream(), self.options.max_body_bytes, left)
        except (ClientDisconnect, ray.exceptions.TaskCancelledError):
            # Starlette's word for a hang-up, or Serve's: the proxy's receive was cancelled with the request.
            msg = "the client closed the connection before its body arrived."
            raise ApiError(CLIENT_CLOSED, "client_closed", msg) from None
        finally:
            self.receiving -= 1

    @contextlib.asynccontextmanager
    async def _in_flight(self) -> AsyncIterator[None]:
        """An inspection whose whole body arrived, counted toward the overload limit while it is decoded and scored."""
        self.inflight += 1
        try:
            if self.inflight > self.capacity:
                raise ApiError(503, "overloaded", OVERLOADED)
            yield
        finally:
            self.inflight -= 1

    def _served(self, product: str) -> _Entry:
        entry = self.banks.get(product)
        if entry is None:
            if product in self.failed:
                raise ApiError(503, "bank_unavailable", f"bank {product!r} failed to load: {self.failed[product]}")
            raise ApiError(404, "unknown_product", f"no bank {product!r}. Served: {sorted(self.banks)}.")
        return entry

    async def _inspect(self, product: str, request: Request, mask: str | None, map_: str | None, began: float) -> JSONResponse:
        entry = self._admit(product, request)
        want_mask, want_map = query_flags(mask, map_)
        timeout = request_timeout(request.headers.get(TIMEOUT_HEADER), self.options.timeout_s)
        body = await self._body(request, began, timeout)
        async with self._in_flight():
            pixels = await asyncio.to_thread(decode_image, body, entry.info.transform, self.options.max_body_bytes,
                                             request.headers.get("content-type"))
            del body
            remaining = timeout - (time.perf_counter() - began)
            request_ = ScoreRequest(entry.info.model_id, pixels, [entry.ref], want_mask, want_map)
            result = await self._score(entry, request_, remaining)
        self.metrics.model_call(product, result.pop("call"))
        self.observe_score(product, entry.info.sha256, result.get("normalized"), inspection=True)
        out: dict[str, Any] = {
            "product": product,
            "bank_sha256": entry.info.sha256,
            "score": result.pop("score"),
            "normalized": result.pop("normalized"),
            "threshold": result.pop("threshold"),  # from the Decision that made the label
            "label": result.pop("label"),
            **result,
        }
        if out["threshold"] is None:
            out["note"] = UNCALIBRATED
        out["latency_ms"] = round(1000.0 * (time.perf_counter() - began), 3)
        return JSONResponse(out)

    # ------------------------------------------------------------------ Open Inference Protocol v2 (ocbank/serve/oip.py)
    @api.get("/v2")
    async def v2_server(self) -> JSONResponse:
        return JSONResponse(oip.server_metadata(__version__))

    @api.get("/v2/health/live")
    async def v2_live(self) -> JSONResponse:
        return JSONResponse({"live": True})

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> JSONResponse:
        self._start_warming()
        if self.ready and not self.draining:
            return JSONResponse({"ready": True})
        return JSONResponse(oip.error_body(self.not_ready_reason()), status_code=400)  # the protocol: 4xx = not ready

    @api.get("/v2/models/{product}")
    async def v2_model(self, product: str, request: Request) -> JSONResponse:
        return self._v2_model(product, None, request)

    @api.get("/v2/models/{product}/versions/{version}")
    async def v2_model_version(self, product: str, version: str, request: Request) -> JSONResponse:
        return self._v2_model(product, version, request)

    def _v2_model(self, product: str, version: str | None, request: Request) -> JSONResponse:
        try:
            entry = self._served(product)
            oip.check_version(entry.info, version)
        except ApiError as exc:
            return _error_for(request, exc)
        return JSONResponse(oip.model_metadata(entry.info))

    @api.get("/v2/models/{product}/ready")
    async def v2_model_ready(self, product: str, request: Request) -> JSONResponse:
        return self._v2_model_ready(product, None, request)

    @api.get("/v2/models/{product}/versions/{version}/ready")
    async def v2_model_version_ready(self, product: str, version: str, request: Request) -> JSONResponse:
        return self._v2_model_ready(product, version, request)

    def _v2_model_ready(self, product: str, version: str | None, request: Request) -> JSONResponse:
        try:
            entry = self._served(product)
            oip.check_version(entry.info, version)
        except ApiError as exc:
            return _error_for(request, exc)
        if entry.info.model_id not in self.prepared or self.draining:
            reason = "shutting down" if self.draining else f"bank {product!r} is loading"
            return JSONResponse(oip.error_body(reason), status_code=400)
        return JSONResponse({"name": product, "ready": True})

    @api.post("/v2/models/{product}/infer")
    async def v2_infer(self, product: str, request: Request) -> Response:
        return await self._counted(product, request, lambda began: self._v2_infer(product, None, request, began))

    @api.post("/v2/models/{product}/versions/{version}/infer")
    async def v2_infer_version(self, product: str, version: str, request: Request) -> Response:
        return await self._counted(product, request, lambda began: self._v2_infer(product, version, request, began))

    async def _v2_infer(self, product: str, version: str | None, request: Request, began: float) -> Response:
        """One v2 inference request: its images scored like ``/v1/inspect``'s, concurrently, so they batch together."""
        entry = self._admit(product, request)
        oip.check_version(entry.info, version)
        timeout = request_timeout(request.headers.get(TIMEOUT_HEADER), self.options.timeout_s)
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            msg = f"Content-Encoding {request.headers['content-encoding']!r} is not accepted; send the request uncompressed."
            raise ApiError(415, "unsupported_encoding", msg)
        body = await self._body(request, began, timeout)
        async with self._in_flight():
            return await self._v2_scored(entry, body, request, began, timeout)

    async def _v2_scored(self, entry: _Entry, body: bytes, request: Request, began: float, timeout: float) -> Response:
        """The rest of :meth:`_v2_infer` once its body arrived: the images decoded and scored concurrently."""
        product = entry.info.product
        limit = self.options.max_body_bytes
        parsed = await asyncio.to_thread(oip.parse_infer, body, request.headers.get(oip.HEADER_LENGTH), entry.info,
                                         self.options.max_batch)
        pixels = await asyncio.gather(*(
            asyncio.to_thread(decode_image, image, entry.info.transform, limit, where=oip.element(i), hint=oip.HINT)
            for i, image in enumerate(parsed.images)))
        remaining = timeout - (time.perf_counter() - began)
        want_mask = parsed.wants("mask")
        results = await asyncio.gather(
            *(self._score(entry, ScoreRequest(entry.info.model_id, px, [entry.ref], want_mask, False), remaining)
              for px in pixels), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        for result in results:
            self.metrics.model_call(product, result.pop("call"))
            self.observe_score(product, entry.info.sha256, result.get("normalized"), inspection=True)
        content, headers = await asyncio.to_thread(oip.infer_response, entry.info, parsed, list(results))
        return Response(content, headers=headers)

    @staticmethod
    async def _await(response: Any) -> Any:
        return await response

    async def _score(self, entry: _Entry, req: ScoreRequest, timeout: float) -> dict[str, Any]:
        if timeout <= 0:
            raise ApiError(408, "timeout", "the request timed out while its image was decoded. Raise X-Timeout-Ms.")
        response = self.scorer.options(multiplexed_model_id=entry.info.model_id).score.remote(req)
        try:
            return await asyncio.wait_for(self._await(response), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            msg = f"no result within {timeout * 1000:.0f} ms (X-Timeout-Ms). Retry, or allow more time."
            raise ApiError(408, "timeout", msg) from None
        except BackPressureError:
            raise ApiError(503, "overloaded", OVERLOADED) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            msg = f"the model replica was lost ({type(exc).__name__}); Serve is replacing it. Retry."
            raise ApiError(503, "replica_unavailable", msg) from None


def build_app(options: ServeOptions) -> Any:
    """The Serve application for ``options`` (bind, not run)."""
    scorer = Scorer.options(
        num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing,
        max_queued_requests=options.max_queued,
        ray_actor_options={"num_cpus": options.replica_cpus},
    ).bind(options)
    # The ingress holds every request until its answer: enough for the replicas' share plus the queue,
    # the uploads still arriving, and the other routes.
    ingress_ongoing = options.replicas * options.max_ongoing + options.max_queued + MAX_RECEIVING + 64
    return Api.options(max_ongoing_requests=ingress_ongoing).bind(scorer, options)
