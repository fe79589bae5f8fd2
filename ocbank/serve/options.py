"""What ``ocbank serve`` is asked to do, validated once, and how replicas are sized from it."""

from __future__ import annotations

import errno
import math
import os
import socket
from dataclasses import dataclass, field

from ..config import check_device
from ..errors import ConfigError, PortInUseError
from .auth import Secret, check_exposure, read_token

RUNTIMES = ("auto", "torch", "onnxruntime")
APP_NAME = "ocbank"
# Body size above which a request is refused (413) before it is decoded.
MAX_BODY_BYTES = 64 << 20
PORTS = (1, 65535)  # the TCP ports a server may listen on (0 would be a random one nobody is told)


def check_port(port: object, where: str = "serve option port") -> int:
    """The one rule for a listening port: an integer in :data:`PORTS`."""
    low, high = PORTS
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= high:
        msg = f"{where} must be an integer from {low} to {high}, got {port!r}. Pick a free TCP port, e.g. 8000."
        raise ConfigError(msg)
    return port


def check_port_free(host: str, port: int) -> None:
    """PortInUseError (one line) unless ``host:port`` can be listened on: anything bound there counts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                msg = (f"port {port} on {host} is already in use (another ocbank serve, or any other server). "
                       "Stop that server, or pick another --port.")
            else:
                msg = f"cannot listen on {host}:{port}: {exc.strerror or exc}. Check --host and --port."
            raise PortInUseError(msg) from None


@dataclass(frozen=True)
class ServeOptions:
    """``ocbank serve`` options (each default is the CLI's).

    ``replicas`` model replicas share ``cpus`` (default: this machine's cores) so that
    torch threads never oversubscribe them; ``max_queued`` requests may wait for a
    replica beyond the ``2 * max_batch`` each one holds, and the rest get 503.
    """

    banks: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    address: str | None = None
    runtime: str = "auto"
    max_queued: int = 64
    timeout_s: float = 60.0  # per request, unless the X-Timeout-Ms header says otherwise
    max_banks_per_replica: int = 8  # banks a replica keeps loaded (least recently used evicted beyond)
    cpus: int | None = None
    device: str | None = None  # None: each bank's configured device
    max_body_bytes: int = MAX_BODY_BYTES
    admin_token_file: str | None = None  # reload, feedback, learn and rollback need this Bearer token
    inspect_token_file: str | None = None  # inspection needs this (or the admin) Bearer token
    allow_unauthenticated: bool = False  # listen beyond loopback with no admin token, knowingly
    # Read from the files at start; their repr never shows them.
    admin_token: Secret | None = field(default=None, init=False, repr=False, compare=False)
    inspect_token: Secret | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("replicas", "max_batch", "max_queued", "max_banks_per_replica", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"serve option {name} must be a positive integer, got {value!r}."
                raise ConfigError(msg)
        check_port(self.port)
        for name in ("batch_wait_ms", "timeout_s"):
            value = getattr(self, name)
            # A zero timeout would answer every request 408; a zero batch wait just means no waiting.
            low_ok = value >= 0 if name == "batch_wait_ms" else value > 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low_ok:
                bound = ">= 0" if name == "batch_wait_ms" else "> 0"
                msg = f"serve option {name} must be a finite number {bound}, got {value!r}."
                raise ConfigError(msg)
        if self.device is not None:
            check_device(self.device, where="--device")
        if self.runtime not in RUNTIMES:
            msg = f"--runtime must be one of {RUNTIMES}, got {self.runtime!r}."
            raise ConfigError(msg)
        if self.cpus is not None and (not isinstance(self.cpus, int) or self.cpus < 1):
            msg = f"--cpus must be an integer >= 1, got {self.cpus!r}."
            raise ConfigError(msg)
        for name in ("admin_token_file", "inspect_token_file"):
            path = getattr(self, name)
            if path is not None:
                option = "--" + name.replace("_", "-")
                object.__setattr__(self, name.removesuffix("_file"), read_token(path, option))
        check_exposure(self.host, self.admin_token, self.allow_unauthenticated)

    @property
    def total_cpus(self) -> int:
        return self.cpus or os.cpu_count() or 1

    @property
    def replica_cpus(self) -> float:
        """Ray CPUs reserved per model replica: the cores shared out, never more than exist."""
        return self.total_cpus / self.replicas

    @property
    def replica_threads(self) -> int:
        """torch / onnxruntime threads per replica: its share of the cores, at least one."""
        return max(1, int(self.replica_cpus))

    @property
    def max_ongoing(self) -> int:
        """Requests one replica holds: one batch running while the next one fills."""
        return 2 * self.max_batch
