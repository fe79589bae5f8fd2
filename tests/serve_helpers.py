"""Running ``ocbank serve`` in a test: a subprocess on a free loopback port, a stdlib HTTP client, cleanup."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
START_S = 300  # a cold Ray + Serve start on a busy 2-core machine
HTTP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One connection per call, JSON bodies, an optional Bearer token."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token

    def call(self, method: str, path: str, body: bytes | None = None, token: str | None = "default",
             timeout: float = HTTP_TIMEOUT_S) -> tuple[int, Any, dict[str, str]]:
        headers = {}
        sent = self.token if token == "default" else token
        if sent:
            headers["Authorization"] = f"Bearer {sent}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode()
            got = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        data = json.loads(raw) if "json" in got.get("content-type", "") else raw
        return resp.status, data, got

    def wait_learn(self, product: str, limit_s: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            status, body, _ = self.call("GET", f"/v1/banks/{product}/learn")
            assert status == 200, body
            if body["state"] != "running":
                return body
            time.sleep(0.5)
        raise AssertionError(f"the learn of {product} did not end within {limit_s} s")


def tree(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def start_server(banks: Path, log_path: Path, token_file: Path | None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Start ``ocbank serve`` on ``banks`` and wait until it is ready (or fail with its log)."""
    port = free_port()
    log = open(log_path, "a+")  # noqa: SIM115 - closed by stop_server
    cmd = [sys.executable, "-m", "ocbank.cli", "serve", "--banks", str(banks), "--port", str(port),
           "--runtime", "torch", "--cpus", "2", *extra]
    if token_file is not None:
        cmd += ["--admin-token-file", str(token_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    server = {"proc": proc, "log": log, "log_path": log_path, "port": port}
    client = Client(port)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if client.call("GET", "/readyz")[0] == 200:
                return server
        time.sleep(1.0)
    stop_server(server)
    raise AssertionError(f"ocbank serve did not become ready in {START_S} s:\n{log_path.read_text()[-3000:]}")


def session_dirs(server: dict[str, Any]) -> set[Path]:
    """The Ray temp folders of the server's cluster (its logs), found from its processes' command lines."""
    found = set()
    for p in tree(server["proc"].pid):
        with contextlib.suppress(psutil.Error):
            for arg in p.cmdline():
                if "/ocbray-" in arg:
                    tail = arg.split("/ocbray-", 1)[1].split("/", 1)[0]
                    head = arg.split("/ocbray-", 1)[0].split("=")[-1]
                    found.add(Path(f"{head}/ocbray-{tail}"))
    return {d for d in found if d.is_dir()}


def kill_tree(server: dict[str, Any]) -> None:
    """SIGKILL the server and every process it started (a crash of the whole service)."""
    children = tree(server["proc"].pid)
    with contextlib.suppress(ProcessLookupError):
        server["proc"].send_signal(signal.SIGKILL)
    server["proc"].wait(timeout=30)
    for p in children:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(children, timeout=30)


def stop_server(server: dict[str, Any], wait_s: float = 60) -> None:
    """SIGTERM, then (after ``wait_s``) SIGKILL what is left; no Ray process outlives it."""
    proc = server["proc"]
    children = tree(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for p in children:
        with contextlib.suppress(psutil.Error):
            p.kill()
    server["log"].close()
