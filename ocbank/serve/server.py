"""``ocbank serve``: start (or join) Ray, run the application, serve until SIGTERM / SIGINT, shut down cleanly.

One server per port: before a local Ray starts, the port is checked free (else one line,
exit 2), and the Serve proxy binds it for this server alone (:mod:`ocbank.serve.proxy`,
which also keeps the proxy from reading a body past the size limit).
Signals: SIGTERM and SIGINT stop a start-up at any stage (the caller's handlers stay in
force through ``ray.init``, which would install its own); once serving, they stop it.
Shutdown: the ingress stops taking inspections (503) and waits for those in flight
(up to :data:`DRAIN_S`), then Serve and the Ray this process started are shut down,
and any process it started that is still alive is terminated, so nothing outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import DependencyError, ServeError
from . import proxy
from .banks import list_banks
from .options import APP_NAME, ServeOptions, check_port_free

log = logging.getLogger(__name__)

DRAIN_S = 20.0  # in-flight requests get this long to finish after SIGTERM
WARM_S = 600.0  # the first load of every bank (the ONNX export runs here)
_CHILD_GRACE_S = 3.0
EVENTS_TIMEOUT_S = 5.0  # one poll of the ingress's terminal lines
# Ray's driver-side loggers and the level below which their lines are Ray's own bookkeeping:
# INFO (a local Ray started, Serve started, "Connecting to existing Serve app ... will not be
# applied" from serve.run after serve.start); ocbank announces what the user needs. The token
# module's one warning says that a new local cluster uses token authentication, Ray's default,
# which ocbank keeps. Every other warning and error still shows.
_RAY_LOGGERS = {"ray": logging.WARNING, "ray.serve": logging.WARNING,
                "ray._private.authentication.authentication_token_setup": logging.ERROR}


def _import_serve() -> tuple[Any, Any]:
    try:
        import ray  # noqa: PLC0415
        from ray import serve  # noqa: PLC0415
    except ImportError as exc:
        msg = f"ocbank serve needs Ray Serve: {exc}. Install the extra: pip install 'ocbank[serve]'."
        raise DependencyError(msg) from exc
    return ray, serve


def _quiet_ray() -> None:
    for name, level in _RAY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def not_served(failed: dict[str, str]) -> list[str]:
    """One ``ocbank: error:`` line per bank that could not be loaded, naming it and why."""
    return [f"ocbank: error: bank {product!r} is not served: {why}" for product, why in sorted(failed.items())]


def _descendants() -> list[Any]:
    import psutil  # noqa: PLC0415

    with contextlib.suppress(psutil.Error):
        return psutil.Process().children(recursive=True)
    return []


def _end_processes(procs: list[Any]) -> None:
    """Terminate, then kill, processes this one started that outlived the Ray shutdown."""
    import psutil  # noqa: PLC0415

    _, alive = psutil.wait_procs(procs, timeout=_CHILD_GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=_CHILD_GRACE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


class Server:
    """One ``ocbank serve`` run: :meth:`start`, then :meth:`stop` (both idempotent)."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self._ray, self._serve = _import_serve()
        self._temp: str | None = None
        self._own_ray = False  # a local cluster this run started
        self._connected = False  # ray.init was called by this run (else the caller's Ray is left up)
        self.handle: Any = None
        self.warm: dict[str, Any] = {}

    def start(self) -> Server:
        """Start Ray and the application, and load every bank once.

        :class:`ServeError` (everything started is stopped first) when no bank could be
        loaded; the banks that could not are in ``self.warm["failed"]``, by product.
        """
        opts = self.options
        list_banks(opts.banks)  # refuse an empty or missing folder before starting anything
        if opts.device is not None and not opts.address:
            from ..engine import resolve_device  # noqa: PLC0415

            # A local Ray's replicas see this machine's devices: refuse an unusable one now,
            # with the message predict gives, not after Ray has started.
            resolve_device(opts.device)
        ray = self._ray
        _quiet_ray()
        if not ray.is_initialized():
            self._connected = True
            if opts.address:
                self._init_ray(address=opts.address, include_dashboard=False, log_to_driver=False,
                               logging_level=logging.WARNING)
            else:
                check_port_free(opts.host, opts.port)  # before Ray starts: the answer comes at once
                # A short private temp dir: Ray's socket paths must stay under ~107 characters,
                # and this cluster's files never mix with another Ray on the machine.
                self._temp = tempfile.mkdtemp(prefix="ocbray-", dir="/tmp" if os.path.isdir("/tmp") else None)
                self._own_ray = True  # from here on, stop() ends whatever of it has started
                with _environment(proxy.environment(opts.max_body_bytes)):  # Ray's processes inherit it
                    self._init_ray(num_cpus=opts.total_cpus, include_dashboard=False, log_to_driver=False,
                                   logging_level=logging.WARNING, _temp_dir=self._temp)
        from .app import build_app  # noqa: PLC0415

        try:
            self._serve.start(http_options={"host": opts.host, "port": opts.port})
            self.handle = self._serve.run(build_app(opts), name=APP_NAME, route_prefix="/", blocking=False)
            self.warm = self.handle.warm.remote().result(timeout_s=WARM_S)
            if not self.warm.get("banks"):
                failed = self.warm.get("failed") or {}
                why = " ".join(f"bank {p!r}: {m}" for p, m in sorted(failed.items()))
                msg = f"no bank in {opts.banks} can be served. {why}"
                raise ServeError(msg)
        except BaseException:
            self.stop()
            raise
        return self

    def _init_ray(self, **kwargs: Any) -> None:
        """``ray.init``, with this process's SIGTERM handler in force before, during and after it.

        ray.init installs a handler that calls ``sys.exit``; a SIGTERM it catches is handed
        back to the handler that was there (the CLI's: stop, clean up, exit 143).
        """
        if threading.current_thread() is not threading.main_thread():
            self._ray.init(**kwargs)
            return
        handler = signal.getsignal(signal.SIGTERM)
        handler = signal.SIG_DFL if handler is None else handler
        try:
            self._ray.init(**kwargs)
        except SystemExit as exc:
            if exc.code != signal.SIGTERM:
                raise
            signal.signal(signal.SIGTERM, handler)
            signal.raise_signal(signal.SIGTERM)  # the caller's handler raises (or the default ends us)
            raise
        finally:
            signal.signal(signal.SIGTERM, handler)

    def announce_events(self, seen: int, announce: Callable[[str], None]) -> int:
        """Print the ingress's lines (reload, learn, rollback) newer than ``seen``; return the newest one's number."""
        with contextlib.suppress(Exception):  # a busy or restarting ingress: the lines come on the next poll
            for seq, line in self.handle.events_since.remote(seen).result(timeout_s=EVENTS_TIMEOUT_S):
                announce(line)
                seen = max(seen, seq)
        return seen

    def stop(self, drain_s: float = DRAIN_S) -> None:
        procs = _descendants() if self._own_ray else []
        if self.handle is not None:
            with contextlib.suppress(Exception):
                left = self.handle.drain.remote(drain_s).result(timeout_s=drain_s + 5)
                if left:
                    log.warning("%d request(s) still in flight after %.0f s; shutting down anyway", left, drain_s)
            self.handle = None
        if self._ray.is_initialized():
            if not self._own_ray:  # a shared cluster keeps its other applications
                with contextlib.suppress(Exception):
                    self._serve.delete(APP_NAME)
            # Our own cluster goes down whole: the requests are drained, and Serve's own
            # shutdown waits on its controller for up to 30 s more.
            if self._connected:
                self._ray.shutdown()
                self._connected = False
        if procs:
            _end_processes(procs)
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block (processes started in it inherit them), then as before."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _to_stdout(line: str) -> None:
    print(line, flush=True)  # at once, also when stdout is a file or a pipe


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve_forever(options: ServeOptions, announce: Callable[[str], None] = _to_stdout,
                  complain: Callable[[str], None] = _to_stderr) -> int:
    """Serve until SIGTERM or SIGINT, shut down cleanly, and return the signal's number.

    Each bank that could not be loaded is named on ``complain`` and the others are served;
    :class:`ServeError` when none could be. While it starts, the caller's handlers stop it
    (the CLI's raise, and the start-up is undone); once it serves, a signal ends the serving
    loop, and one during the shutdown does not cut the clean-up short.
    """
    stopped_by: list[int] = []
    stop = threading.Event()
    server = Server(options)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum: int, _frame: object) -> None:
        stopped_by.append(signum)
        stop.set()

    try:
        server.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        for line in not_served(server.warm.get("failed") or {}):
            complain(line)
        banks = server.warm.get("banks") or []
        announce(f"ocbank serve: {len(banks)} bank(s) on http://{options.host}:{options.port} "
                 f"(replicas {options.replicas}, runtime {options.runtime}); SIGTERM or Ctrl-C stops it")
        seen = 0
        while not stop.wait(0.5):
            seen = server.announce_events(seen, announce)
        announce("ocbank serve: stopping (finishing requests in flight)")
        return stopped_by[0]
    finally:
        began = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        try:
            server.stop()
        finally:
            for sig, handler in previous.items():  # the caller's handlers again, in-process too
                signal.signal(sig, handler)
        log.info("stopped in %.1f s", time.monotonic() - began)
