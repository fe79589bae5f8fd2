"""What ``ocbank serve`` runs inside Ray Serve's HTTP proxy, before it binds its port.

Ray calls :func:`setup` in the proxy's process (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``,
set by :func:`environment` for the processes of a local Ray):

- **One server per port.** Ray's proxy binds with SO_REUSEPORT, with which a second server
  binds the same port and the kernel splits connections between the two: a client would be
  answered by another server's banks, with nothing said. Here it binds with SO_REUSEADDR
  only, so a second bind fails, and a restart is still not refused for the previous server's
  connections in TIME_WAIT.
- **No body read past the limit.** The proxy reads each request body as fast as the client
  sends it and queues it for the ingress, however large. :class:`BodyCap` passes a body on
  until it has passed the ingress's limit (which then answers 413) and reads no more of it:
  the rest stays with the client (TCP flow control), not in the proxy's or ingress's memory.

This module imports nothing heavy: the proxy imports it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
BODY_LIMIT_ENV = "OCBANK_MAX_BODY_BYTES"


def environment(max_body_bytes: int) -> dict[str, str]:
    """The variables that make Ray's processes (started with them) call :func:`setup` in the proxy."""
    return {CALLBACK_ENV: f"{__name__}.setup", BODY_LIMIT_ENV: str(max_body_bytes)}


class BodyCap:
    """ASGI middleware: each request body is passed on until more than ``max_bytes`` came, then no more is read.

    The message that crosses the limit is passed on, so the ingress sees the body is too
    large and answers 413; the proxy then waits, reading nothing, until that answer ends
    the request (and Serve cancels this receive).
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0

        async def capped() -> dict[str, Any]:
            nonlocal seen
            if seen > self.max_bytes:
                await asyncio.Event().wait()  # until the answer ends the request
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
            return message

        await self.app(scope, capped, send)


def setup() -> list[Any]:
    """Ray Serve's HTTP proxy callback: bind exclusively, cap bodies; returns the proxy's middlewares."""
    from ray.serve._private import http_util  # noqa: PLC0415
    from starlette.middleware import Middleware  # noqa: PLC0415

    def reuse_address_only(sock: socket.socket) -> bool:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return True

    http_util.set_socket_reuse_port = reuse_address_only  # called by the proxy right before it binds
    limit = os.environ.get(BODY_LIMIT_ENV)
    return [Middleware(BodyCap, max_bytes=int(limit))] if limit else []
