"""The service's learning loop and its locks: feedback, learn, versions, rollback, calibration health.

:class:`AdminRoutes` is mixed into the ingress (``Api`` in :mod:`ocbank.serve.app`), whose
state it uses: ``options``, ``banks`` (product -> served entry), ``_served`` (the entry or the
404 / 503 that refuses the product), ``_score`` (the inspection path), ``_reload`` and ``metrics``. Its routes live on :data:`router`, which the ingress's
FastAPI app includes. Reload, feedback, learn and rollback need the admin token when the
server has one (:mod:`ocbank.serve.auth`); reading (versions, the last learn) stays open.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time.
import asyncio
import collections
import hashlib
import logging
import math
import time
from typing import Any

import ray
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import BuildLockError, OcbankError
from . import feedback as fb
from .api import TIMEOUT_HEADER, ApiError, check_length, decode_image, request_timeout
from .auth import authorize
from .banks import bank_path
from .health import FalseAlarmCounts, calibration_health
from .learn import learn, read_journal

log = logging.getLogger(__name__)

router = APIRouter()
EVENTS_KEPT = 256  # terminal lines the server process has not fetched yet are kept up to this many
SHA_SHOWN = 12  # characters of a sha256 in a terminal line (the history files' prefix length)
# The learn task reserves no CPU (the replicas hold them all) and uses one thread, so inspection
# keeps its cores; its worker exits after the task, returning the backbone's memory.
LEARN_TASK_OPTIONS = {"num_cpus": 0, "max_retries": 0, "max_calls": 1}


def _json(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # a Ray task error carries the task's exception
    return " ".join(str(cause).split())[:1000] or type(cause).__name__


def _short(sha: str | None) -> str:
    return sha[:SHA_SHOWN] if sha else "none"


class AdminRoutes:
    """Feedback, learn, versions, rollback and calibration health for the ingress (a mixin: see the module doc)."""

    def init_admin(self) -> None:
        self.counts = FalseAlarmCounts()
        self.learning: dict[str, asyncio.Future[None]] = {}
        self.last_learn: dict[str, dict[str, Any]] = {}
        self.events: collections.deque[tuple[int, str]] = collections.deque(maxlen=EVENTS_KEPT)
        self._event_seq = 0
        self._learn_task = ray.remote(**LEARN_TASK_OPTIONS)(learn)

    # ------------------------------------------------------------------ locks
    def authorize_admin(self, request: Request, what: str) -> None:
        authorize(request.headers.get("authorization"), (self.options.admin_token,), what)

    def authorize_inspect(self, request: Request) -> None:
        if self.options.inspect_token is not None:  # the admin token opens inspection too
            authorize(request.headers.get("authorization"), (self.options.inspect_token, self.options.admin_token),
                      "inspection")

    # ------------------------------------------------------------------ terminal lines
    def announce(self, line: str) -> None:
        """A line for the serve terminal (fetched by the server process with :meth:`events_since`) and the log."""
        self._event_seq += 1
        self.events.append((self._event_seq, line))
        log.info("%s", line)

    async def events_since(self, seq: int) -> list[tuple[int, str]]:
        return [e for e in self.events if e[0] > seq]

    def change_line(self, what: str, product: str, old: Any, new: Any, detail: str = "") -> str:
        """``what`` product: old -> new sha256 and K, and the stale-threshold warning when the new bank has one."""
        k_old = old.info.n_centroids if old is not None else None
        line = (f"ocbank serve: {what} {product}: sha256 {_short(old.info.sha256 if old else None)} -> "
                f"{_short(new.info.sha256)}, K {k_old} -> {new.info.n_centroids}{detail}")
        if new.info.decision is not None and new.info.stale:
            line += f"; warning: {product}'s OK/NG thresholds predate its last update, recalibrate them"
        return line

    async def reload_and_announce(self, product: str, what: str, detail: str = "") -> dict[str, Any]:
        """Reload ``product`` from its file (one reload at a time) and announce the change."""
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        old = self.banks.get(product)
        async with self._reload_lock:
            result = await self._reload(product)
        if result.get("changed"):
            self.announce(self.change_line(what, product, old, self.banks[product], detail))
        return result

    # ------------------------------------------------------------------ health
    def observe_score(self, product: str, sha256: str, normalized: float | None, inspection: bool) -> None:
        self.counts.scored[f"{product}@{sha256}"] += 1
        if inspection and normalized is not None:
            self.metrics.normalized(product, normalized)

    def health(self, product: str) -> dict[str, Any]:
        info = self.banks[product].info
        return calibration_health({"decision": info.decision}, info.stale, self.counts.scored[info.model_id],
                                  self.counts.false_alarms[info.model_id])

    # ------------------------------------------------------------------ feedback
    @router.post("/v1/banks/{product}/feedback", status_code=202)
    async def feedback(self, product: str, request: Request, label: str | None = None) -> JSONResponse:
        try:
            self.authorize_admin(request, "feedback")
            return JSONResponse(await self._feedback(product, request, label), status_code=202)
        except ApiError as exc:
            return _json(exc)

    async def _feedback(self, product: str, request: Request, label: str | None) -> dict[str, Any]:
        began = time.perf_counter()
        entry = self._served(product)
        verdict = fb.check_label(label)
        check_length(request.headers.get("content-length"), self.options.max_body_bytes)
        body = await request.body()
        fid = hashlib.sha256(body).hexdigest()
        scored: dict[str, Any] = {}
        if not (fb.feedback_dir(self.options.banks, product) / f"{fid}{fb.SIDECAR_SUFFIX}").is_file():
            # A new image is scored exactly as an inspection is, and refused the same way when it is not one.
            timeout = request_timeout(request.headers.get(TIMEOUT_HEADER), self.options.timeout_s)
            pixels = await asyncio.to_thread(decode_image, body, entry.info.transform, self.options.max_body_bytes)
            from .app import ScoreRequest  # noqa: PLC0415 - app imports this module

            result = await self._score(entry, ScoreRequest(entry.info.model_id, pixels, [entry.ref]),
                                       timeout - (time.perf_counter() - began))
            self.observe_score(product, entry.info.sha256, result.get("normalized"), inspection=False)
            scored = {**result, "bank_sha256": entry.info.sha256}
        try:
            record = await asyncio.to_thread(fb.store, self.options.banks, product, body, verdict, scored)
        except OSError as exc:
            raise ApiError(507, "not_stored", f"the feedback could not be stored: {_one_line(exc)}. Retry.") from None
        if record["status"] != "duplicate" and record.get("service_label") == "NG" and record.get("bank_sha256"):
            step = 1 if verdict == "OK" else (-1 if record["status"] == "relabelled" else 0)
            self.counts.false_alarms[f"{product}@{record['bank_sha256']}"] += step
        keys = ("id", "status", "label", "score", "normalized", "service_label", "bank_sha256", "time")
        return {"product": product, **{k: record.get(k) for k in keys}}

    # ------------------------------------------------------------------ learn
    @router.post("/v1/banks/{product}/learn", status_code=202)
    async def start_learn(self, product: str, request: Request, max_new_centroids: float | None = None) -> JSONResponse:
        try:
            self.authorize_admin(request, "learn")
            entry = self._served(product)
            if max_new_centroids is not None and not (math.isfinite(max_new_centroids) and max_new_centroids > 0):
                msg = f"max_new_centroids must be a number > 0 (a fraction of K), got {max_new_centroids!r}."
                raise ApiError(400, "bad_request", msg)
            running = self.learning.get(product)
            if running is not None and not running.done():
                msg = f"a learn of {product} is running. Wait for it: GET /v1/banks/{product}/learn."
                raise ApiError(409, "learn_running", msg)
            if entry.info.decision is None:
                msg = f"{product} has no OK/NG thresholds for the gate to hold defects back with. Calibrate it first."
                raise ApiError(409, "uncalibrated", msg)
        except ApiError as exc:
            return _json(exc)
        began = time.time()
        self.last_learn[product] = {"product": product, "state": "running", "old_sha256": entry.info.sha256,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(began))}
        ref = self._learn_task.remote(self.options.banks, product, max_new_centroids)
        self.learning[product] = asyncio.ensure_future(self._finish_learn(product, ref, began))
        return JSONResponse({"product": product, "state": "running", "status": f"/v1/banks/{product}/learn"},
                            status_code=202)

    async def _finish_learn(self, product: str, ref: Any, began: float) -> None:
        report = dict(self.last_learn[product])
        try:
            entry = await ref
            report.update(absorbed=len(entry["absorbed"]), held_back=entry["held_back"], old_sha256=entry["old_sha256"],
                          new_sha256=entry["new_sha256"], note=entry.get("note"), recovered_before=entry.get("recovered_before"))
            held = f", absorbed {len(entry['absorbed'])}, held back {len(entry['held_back'])}"
            if entry["new_sha256"] != entry["old_sha256"]:
                reloaded = await self.reload_and_announce(product, "learned", held)
                report["new_sha256"] = reloaded["bank_sha256"]
            report["state"] = "succeeded"
        except ApiError as exc:  # the reload refused the new file: the old bank serves on
            report.update(state="failed", error=exc.message)
        except (OcbankError, ray.exceptions.RayError) as exc:
            report.update(state="failed", error=_one_line(exc))
        except Exception as exc:  # noqa: BLE001 - reported, never lost in a background future
            log.exception("learn of %s failed", product)
            report.update(state="failed", error=_one_line(exc))
        report["seconds"] = round(time.time() - began, 3)
        if report["state"] == "failed":
            self.announce(f"ocbank serve: learn {product} failed: {report['error']}")
        self.last_learn[product] = report

    @router.get("/v1/banks/{product}/learn")
    async def learn_status(self, product: str) -> JSONResponse:
        if product in self.last_learn:
            return JSONResponse(self.last_learn[product])
        try:
            self._served(product)
        except ApiError as exc:
            return _json(exc)
        journal = await asyncio.to_thread(read_journal, self.options.banks, product)
        if journal is None:
            return JSONResponse({"product": product, "state": "none"})
        # From the journal of an earlier server: a learn it shows unfinished was cut short.
        state = {"learned": "succeeded", "failed": "failed"}.get(journal.get("state"), "interrupted")
        report = {k: journal.get(k) for k in ("old_sha256", "new_sha256", "started", "finished", "seconds", "error")}
        report.update(product=product, state=state, absorbed=len(journal.get("absorbed") or []),
                      held_back=journal.get("held_back") or [])
        return JSONResponse(report)

    # ------------------------------------------------------------------ versions
    @router.get("/v1/banks/{product}/versions")
    async def versions(self, product: str) -> JSONResponse:
        from ..jobs import versions as kept  # noqa: PLC0415

        try:
            entry = self._served(product)
            found = await asyncio.to_thread(kept.list_versions, bank_path(self.options.banks, product))
        except ApiError as exc:
            return _json(exc)
        except OcbankError as exc:
            return _json(ApiError(404, "no_versions", _one_line(exc)))
        return JSONResponse({"product": product, "served_sha256": entry.info.sha256,
                             "versions": [v.to_dict() for v in found]})

    @router.post("/v1/banks/{product}/rollback")
    async def rollback(self, product: str, request: Request, to: str | None = None) -> JSONResponse:
        from ..errors import VersionNotFoundError  # noqa: PLC0415
        from ..jobs import versions as kept  # noqa: PLC0415

        try:
            self.authorize_admin(request, "rollback")
            self._served(product)
            if not to:
                raise ApiError(400, "bad_request", "rollback needs ?to=SHA256 (a prefix will do). "
                                                   f"List the versions: GET /v1/banks/{product}/versions.")
            running = self.learning.get(product)
            if running is not None and not running.done():
                raise ApiError(409, "learn_running", f"a learn of {product} is running; roll back after it ends.")
            try:
                done = await asyncio.to_thread(kept.rollback, bank_path(self.options.banks, product), to)
            except VersionNotFoundError as exc:
                raise ApiError(404, "version_not_found", _one_line(exc)) from None
            except BuildLockError as exc:
                raise ApiError(409, "busy", _one_line(exc)) from None
            reloaded = await self.reload_and_announce(product, "rolled back")
        except ApiError as exc:
            return _json(exc)
        return JSONResponse({"product": product, "old_sha256": done["old_sha256"], "new_sha256": done["new_sha256"],
                             "bank_sha256": reloaded["bank_sha256"], "changed": done["changed"]})
