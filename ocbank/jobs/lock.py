"""The build lock: one build per output folder; a lock left by a dead process is taken over."""

from __future__ import annotations

import contextlib
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


def _lock_is_stale(holder: dict[str, Any], path: Path) -> bool:
    if not holder:  # unreadable: a writer may be mid-way; stale once old
        return time.time() - path.stat().st_mtime > 30
    if holder.get("host") != socket.gethostname():
        return False  # cannot see other machines' processes
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


@contextlib.contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/.ocbank-build.lock``; a lock left by a dead process is taken over."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if _lock_is_stale(holder, path):
                log.warning("removing a stale build lock %s left by pid %s (process gone)", path, holder.get("pid"))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            msg = (
                f"another ocbank build (pid {holder.get('pid')} on {holder.get('host')}) is writing to {out_dir}. "
                f"Wait for it to finish, or use another --out; if no build is running, delete {path}."
            )
            raise BuildLockError(msg) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(mine, fh)
        break
    else:
        msg = f"could not take the build lock {path}. Delete it if no build is running."
        raise BuildLockError(msg)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
