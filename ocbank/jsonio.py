"""Strict, atomic JSON files: the one way ocbank writes JSON.

Strict: ``allow_nan=False``, so a NaN or infinity is a bug that raises instead of
writing ``NaN`` (which is not JSON and breaks other readers); a value that cannot be
computed is written as ``null`` with a reason beside it. numpy scalars and arrays are
converted to plain numbers and lists. Atomic: a temp file in the same folder, fsynced,
then renamed over the target, so readers see the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and paths -> JSON types; anything else is a bug (TypeError)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    msg = f"cannot write {type(value).__name__} {value!r} as JSON."
    raise TypeError(msg)


def dumps(obj: Any) -> str:
    """``obj`` as indented, strict JSON text (ValueError on NaN/inf, TypeError on other objects)."""
    return json.dumps(obj, indent=2, allow_nan=False, default=_plain) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` to ``path`` as strict JSON, atomically; return the path.

    Nothing is written if ``obj`` holds NaN/inf or a non-JSON object: the error is raised first.
    """
    text = dumps(obj)  # fail before touching the file system
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would surprise whoever reads the results
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename (POSIX)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target
