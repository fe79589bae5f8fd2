"""The bank's HDF5 file format, version 1.

Layout:
- dataset ``means``  float32 [K, dim]
- dataset ``counts`` int64 [K]
- attributes ``format`` ("ocbank.ClusterBank"), ``format_version`` (1),
  ``ocbank_version``, ``radius``, ``dim``, ``n_seen``, ``metadata`` (JSON text)
  and ``sha256`` (of the means and counts bytes, so a damaged file never loads).

Files are written atomically: a temp file in the destination directory, flushed
and fsynced, then ``os.replace``d over the target, so a crash mid-save leaves
the previous file intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import CheckpointError

FORMAT_NAME = "ocbank.ClusterBank"
FORMAT_VERSION = 1


@dataclass
class BankState:
    """Everything a bank file holds."""

    means: np.ndarray  # [K, dim] float32
    counts: np.ndarray  # [K] int64
    radius: float
    dim: int
    n_seen: int
    metadata: dict[str, Any] = field(default_factory=dict)


def _digest(means: np.ndarray, counts: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(means, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(counts, dtype="<i8").tobytes())
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Any, suffix: str = ".tmp") -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
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


def write_bank(
    path: str | os.PathLike[str],
    means: np.ndarray,
    counts: np.ndarray,
    radius: float,
    n_seen: int,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write a bank file atomically. ``metadata`` must be JSON-serialisable."""
    import h5py  # noqa: PLC0415

    means = np.ascontiguousarray(means, dtype=np.float32)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    try:
        meta_text = json.dumps(metadata or {}, sort_keys=True)
    except TypeError as exc:
        msg = f"bank metadata must be JSON-serialisable: {exc}. Convert values to str/int/float/list/dict."
        raise ValueError(msg) from exc

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("means", data=means)
            f.create_dataset("counts", data=counts)
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["ocbank_version"] = __version__
            f.attrs["radius"] = float(radius)
            f.attrs["dim"] = int(means.shape[1])
            f.attrs["n_seen"] = int(n_seen)
            f.attrs["metadata"] = meta_text
            f.attrs["sha256"] = _digest(means, counts)

    atomic_write(path, write, suffix=".h5.tmp")


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def read_bank(path: str | os.PathLike[str]) -> BankState:
    """Read and validate a bank file; raise :class:`CheckpointError` on any problem."""
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
        if version != FORMAT_VERSION:
            raise _fail(
                p,
                f"unknown bank format version {version!r}; this ocbank ({__version__}) reads "
                f"version {FORMAT_VERSION}. Upgrade ocbank or rebuild the bank.",
            )
        for name in ("means", "counts"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise _fail(p, f"dataset {name!r} is missing.")
        try:
            means = f["means"][()]
            counts = f["counts"][()]
            radius = float(attrs["radius"])
            dim = int(attrs["dim"])
            n_seen = int(attrs["n_seen"])
            meta_text = attrs.get("metadata", "{}")
            digest = attrs.get("sha256")
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise _fail(p, f"unreadable or missing field ({exc}); the file is damaged.") from exc
    if means.dtype != np.float32 or means.ndim != 2 or means.shape[1] != dim:
        raise _fail(p, f"means must be float32 [K, {dim}], got {means.dtype} {means.shape}.")
    if counts.dtype != np.int64 or counts.shape != (means.shape[0],):
        raise _fail(p, f"counts must be int64 [{means.shape[0]}], got {counts.dtype} {counts.shape}.")
    if not (np.isfinite(radius) and radius > 0):
        raise _fail(p, f"radius must be finite and > 0, got {radius}.")
    if counts.size and counts.min() <= 0:
        raise _fail(p, f"counts must all be >= 1, found {int(counts.min())}.")
    if not np.isfinite(means).all():
        raise _fail(p, "means contain NaN or inf values.")
    if int(counts.sum()) != n_seen:
        raise _fail(p, f"n_seen={n_seen} does not match the sum of counts {int(counts.sum())}.")
    if digest != _digest(means, counts):
        raise _fail(p, "checksum mismatch: the means or counts were altered or damaged.")
    try:
        metadata = json.loads(meta_text)
    except (TypeError, ValueError) as exc:
        raise _fail(p, f"metadata is not valid JSON ({exc}).") from exc
    return BankState(means=means, counts=counts, radius=radius, dim=dim, n_seen=n_seen, metadata=metadata)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The caller's metadata dict of a (fully validated) bank file."""
    return read_bank(path).metadata
