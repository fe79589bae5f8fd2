"""The bank's HDF5 file format, version 2 (reads version 1).

Layout (version 2):
- dataset ``means``  float32 [K, dim]
- dataset ``counts`` int64 [K]
- dataset ``m2``     float64 [K], each centroid's Welford second moment sum ||x - mu||^2
- attributes ``format`` ("ocbank.ClusterBank"), ``format_version`` (2),
  ``ocbank_version``, ``radius`` (the current radius), ``dim``, ``n_seen``,
  ``metadata`` (JSON text), ``spread_known`` (False when m2 was not tracked for
  every vector, e.g. a bank continued from a version-1 file), ``max_centroids``
  (0 = no cap), ``radius_growth``, ``radius_history`` (JSON list of the cap's
  radius raises) and ``sha256`` (of the means, counts and m2 bytes, so a damaged
  file never loads).

Version-1 files (no ``m2``, no cap attributes) are read with m2 = zeros and
``spread_known = False``: the spread of their centroids is unknown, never
silently zero. They are written back as version 2.

Files are written atomically: a temp file ``.<name>.<host>.<pid>.<random>.h5.tmp``
in the destination directory, flushed and fsynced, then ``os.replace``d over the
target, so a crash mid-save leaves the previous file intact. Temp files of dead
writers on this host (a SIGKILLed save) are removed by the next write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import CheckpointError

FORMAT_NAME = "ocbank.ClusterBank"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# A folder of banks: ``<name>.h5`` finished, ``<name>.partial.h5`` a build's checkpoint.
BANK_SUFFIX = ".h5"
PARTIAL_SUFFIX = ".partial.h5"


def bank_file_path(folder: str | os.PathLike[str], name: str, partial: bool = False) -> Path:
    """Where bank ``name`` (or its unfinished build checkpoint) lives in ``folder``."""
    return Path(folder) / f"{name}{PARTIAL_SUFFIX if partial else BANK_SUFFIX}"


def is_checkpoint_name(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named as a build's unfinished checkpoint."""
    return os.fspath(path).endswith(PARTIAL_SUFFIX)


@dataclass
class BankState:
    """Everything a bank file holds.

    ``m2`` None means the second moments are unknown (as in a version-1 file):
    the bank then starts them at zero with ``spread_known = False``.
    """

    means: np.ndarray  # [K, dim] float32
    counts: np.ndarray  # [K] int64
    radius: float
    dim: int
    n_seen: int
    metadata: dict[str, Any] = field(default_factory=dict)
    m2: np.ndarray | None = None  # [K] float64
    spread_known: bool = True
    max_centroids: int | None = None
    radius_growth: float = 1.25
    radius_history: list[dict[str, Any]] = field(default_factory=list)


def _digest(means: np.ndarray, counts: np.ndarray, m2: np.ndarray | None = None) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(means, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(counts, dtype="<i8").tobytes())
    if m2 is not None:
        h.update(np.ascontiguousarray(m2, dtype="<f8").tobytes())
    return h.hexdigest()


def problems(state: BankState) -> str | None:
    """The first reason ``state`` is not a consistent bank, or None.

    Checks dtypes and shapes, counts >= 1 summing to n_seen, finite means,
    finite non-negative m2, a radius that is finite and > 0, and the cap.
    """
    means, counts, m2, dim = state.means, state.counts, state.m2, state.dim
    if means.dtype != np.float32 or means.ndim != 2 or means.shape[1] != dim:
        return f"means must be float32 [K, {dim}], got {means.dtype} {means.shape}."
    k = means.shape[0]
    if counts.dtype != np.int64 or counts.shape != (k,):
        return f"counts must be int64 [{k}], got {counts.dtype} {counts.shape}."
    if m2 is not None and (m2.dtype != np.float64 or m2.shape != (k,)):
        return f"m2 must be float64 [{k}], got {m2.dtype} {m2.shape}."
    radius = float(state.radius)
    if not (np.isfinite(radius) and radius > 0 and np.isfinite(radius * radius)):
        return f"radius must be finite and > 0 (with a finite square), got {radius}."
    if counts.size and counts.min() <= 0:
        return f"counts must all be >= 1, found {int(counts.min())}."
    if not np.isfinite(means).all():
        return "means contain NaN or inf values."
    if m2 is not None and not (np.isfinite(m2).all() and (m2 >= 0).all()):
        return "m2 must be finite and >= 0, found NaN, inf or negative values."
    if int(counts.sum()) != state.n_seen:
        return f"n_seen={state.n_seen} does not match the sum of counts {int(counts.sum())}."
    cap = state.max_centroids
    if cap is not None and k > cap:
        return f"the bank holds {k} centroids, more than its max_centroids={cap}."
    return None


def fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _host() -> str:
    """This host's name, reduced to characters that are safe in a file name."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: keep its file
    return True


def remove_stale_temps(target: Path, suffix: str) -> list[Path]:
    """Delete ``.<name>.<host>.<pid>.*<suffix>`` siblings of ``target`` left by dead pids of this host.

    Files of other hosts (a shared directory) and of live processes are kept.
    Returns the removed paths.
    """
    name, sfx = re.escape(target.name), re.escape(suffix)
    pattern = re.compile(rf"^\.{name}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+{sfx}$")
    host = _host()
    removed = []
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            m = pattern.match(entry.name)
            if m is None or m["host"] != host or _pid_alive(int(m["pid"])):
                continue
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


def atomic_write(path: str | os.PathLike[str], write: Any, suffix: str = ".tmp") -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it over ``path``.

    The temp file carries this host's name and pid; temp files of dead writers
    on this host are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target, suffix)
    # Not mkstemp, which makes 0600 files: O_EXCL with mode 0666 lets the kernel apply the current
    # umask, so banks get the mode a plain open() would (readable by Ray workers on shared storage).
    while True:
        tmp = str(target.parent / f".{target.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def write_bank(path: str | os.PathLike[str], state: BankState) -> None:
    """Write ``state`` atomically as a version-2 file.

    The state is checked first (see :func:`problems`); an inconsistent one
    raises :class:`CheckpointError` and nothing is written. ``metadata`` must be
    JSON-serialisable.
    """
    import h5py  # noqa: PLC0415

    m2 = np.zeros(len(state.counts), dtype=np.float64) if state.m2 is None else state.m2
    state = BankState(
        np.ascontiguousarray(state.means),
        np.ascontiguousarray(state.counts),
        float(state.radius),
        int(state.dim),
        int(state.n_seen),
        state.metadata,
        np.ascontiguousarray(m2),
        bool(state.spread_known and state.m2 is not None),
        state.max_centroids,
        float(state.radius_growth),
        list(state.radius_history),
    )
    problem = problems(state)
    if problem is not None:
        msg = f"{path}: refusing to save an inconsistent bank: {problem} Nothing was written."
        raise CheckpointError(msg)
    try:
        meta_text = json.dumps(state.metadata or {}, sort_keys=True)
        history_text = json.dumps(state.radius_history, sort_keys=True)
    except TypeError as exc:
        msg = f"bank metadata must be JSON-serialisable: {exc}. Convert values to str/int/float/list/dict."
        raise CheckpointError(msg) from exc

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("means", data=state.means)
            f.create_dataset("counts", data=state.counts)
            f.create_dataset("m2", data=state.m2)
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["ocbank_version"] = __version__
            f.attrs["radius"] = state.radius
            f.attrs["dim"] = state.dim
            f.attrs["n_seen"] = state.n_seen
            f.attrs["metadata"] = meta_text
            f.attrs["spread_known"] = state.spread_known
            f.attrs["max_centroids"] = int(state.max_centroids or 0)
            f.attrs["radius_growth"] = state.radius_growth
            f.attrs["radius_history"] = history_text
            f.attrs["sha256"] = _digest(state.means, state.counts, state.m2)

    atomic_write(path, write, suffix=".h5.tmp")


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def read_bank(path: str | os.PathLike[str]) -> BankState:
    """Read and validate a bank file (version 1 or 2); raise :class:`CheckpointError` on any problem."""
    import h5py  # noqa: PLC0415

    p = Path(path)
    if not p.is_file():
        raise _fail(p, "no such bank file. Check the path, or build the bank first.")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise _fail(p, f"not a readable HDF5 bank file (truncated or foreign): {exc}") from exc
    with f:
        attrs = f.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise _fail(p, f"not an ocbank bank file (format attribute is {attrs.get('format')!r}).")
        version = attrs.get("format_version")
        version = version.item() if isinstance(version, np.generic) else version
        if version not in READABLE_VERSIONS:
            raise _fail(
                p,
                f"unknown bank format version {version!r}; this ocbank ({__version__}) reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}. Upgrade ocbank or rebuild the bank.",
            )
        names = ("means", "counts", "m2") if version >= 2 else ("means", "counts")
        for name in names:
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise _fail(p, f"dataset {name!r} is missing.")
        try:
            means = f["means"][()]
            counts = f["counts"][()]
            m2 = f["m2"][()] if version >= 2 else None
            radius = float(attrs["radius"])
            dim = int(attrs["dim"])
            n_seen = int(attrs["n_seen"])
            meta_text = attrs.get("metadata", "{}")
            digest = attrs.get("sha256")
            if version >= 2:
                spread_known = bool(attrs["spread_known"])
                cap = int(attrs["max_centroids"])
                growth = float(attrs["radius_growth"])
                history_text = attrs["radius_history"]
            else:
                spread_known, cap, growth, history_text = False, 0, 1.25, "[]"
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise _fail(p, f"unreadable or missing field ({exc}); the file is damaged.") from exc
    try:
        metadata = json.loads(meta_text)
        history = json.loads(history_text)
    except (TypeError, ValueError) as exc:
        raise _fail(p, f"metadata is not valid JSON ({exc}).") from exc
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _fail(p, f"radius_history must be a JSON list of objects, got {history_text!r}.")
    if cap < 0 or (cap and cap < 2) or not (np.isfinite(growth) and growth > 1):
        raise _fail(p, f"max_centroids={cap} / radius_growth={growth} are invalid (need 0 or >= 2, and > 1).")
    state = BankState(
        means, counts, radius, dim, n_seen, metadata, m2, spread_known, cap or None, growth, history
    )
    problem = problems(state)
    if problem is not None:
        raise _fail(p, problem)
    if digest != _digest(means, counts, m2):
        raise _fail(p, "checksum mismatch: the means, counts or m2 were altered or damaged.")
    return state


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The caller's metadata dict of a (fully validated) bank file."""
    return read_bank(path).metadata
