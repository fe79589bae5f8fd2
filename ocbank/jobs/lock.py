"""The build lock: one build or update per output folder, held with ``fcntl.flock`` for its life.

The kernel releases a flock when its holder dies (SIGKILL included), so a lock file
left behind by a dead build is simply *not locked*: the next build takes it, and of
several builds that find it at once exactly one wins. The file holds the holder's pid
and host only so the refusal message can name them; it is never used to decide.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BuildLockError

log = logging.getLogger(__name__)

LOCK_NAME = ".ocbank-build.lock"


def _read_holder(fd: int) -> dict[str, Any]:
    """The JSON written by the holder, or {} while it is being written or if it is foreign."""
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
        holder = json.loads(data.decode("utf-8") or "{}")
        return holder if isinstance(holder, dict) else {}
    return {}


def _same_file(fd: int, path: Path) -> bool:
    """Is ``fd`` still the file at ``path``? (A releasing holder unlinks it.)"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextlib.contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/.ocbank-build.lock`` (flock, exclusive) while the block runs.

    Raises :class:`BuildLockError` naming the holder if another live process holds it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            msg = (
                f"another ocbank build or update (pid {holder.get('pid', '?')} on {holder.get('host', '?')}) is writing to "
                f"{out_dir}. Wait for it to finish, or use another --out."
            )
            raise BuildLockError(msg) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # we locked a file its holder had just unlinked on release: take the new one
    try:
        previous = _read_holder(fd)
        if previous.get("pid") not in (None, os.getpid()):
            log.warning(
                "taking over the stale build lock %s left by pid %s on %s (that build is gone)",
                path, previous.get("pid"), previous.get("host"),
            )
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(mine, allow_nan=False).encode("utf-8"))
        yield
    finally:
        # Unlink while still holding the lock, then release: a waiter that opened the old
        # file sees it is no longer at ``path`` and retries on a fresh one.
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                path.unlink()
        os.close(fd)
