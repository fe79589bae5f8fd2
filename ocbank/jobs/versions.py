"""Bank versions: every update keeps its parent, and a rollback restores one.

A product's bank ``<banks>/<product>.h5`` keeps its earlier versions in
``<banks>/history/<product>@<sha256 prefix>.h5``: content-addressed (a version archived
twice is one file), each written atomically (temp file, fsync, rename) with the
modification time of the version it copies, so that a version's time survives the copy.
Writers (an update archiving its parent, a rollback) hold the build lock of ``<banks>``
(:func:`ocbank.jobs.lock.build_lock`), the lock every build and update of that folder takes.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data import escape_path
from ..engine.checkpoint import atomic_write
from ..errors import DataError, VersionNotFoundError
from ..model.features import file_sha256
from ..model.record import read_record
from . import DEFAULT_KEEP_HISTORY
from .lock import build_lock

HISTORY_DIR = "history"
SHA_PREFIX_CHARS = 12  # of the sha256 in a history file's name: unique among a product's few versions
MIN_SHA_PREFIX = 4  # the shortest --to prefix taken: shorter ones match by chance


@dataclass(frozen=True)
class Version:
    """One version of a product's bank, as ``ocbank history`` lists it."""

    sha256: str  # of the file's bytes
    path: str  # the file (escaped: :func:`ocbank.data.escape_path`)
    time: str  # when this version was written (UTC, ISO 8601): its last update's time, else the file's mtime
    current: bool  # is this the bank file itself (not a copy under history/)
    images_added: int | None  # by the update that made this version; None for a built bank
    images_held: int | None  # held back by that update's gate; None for a built bank or an ungated update
    recalibrated: bool | None  # did that update recalibrate the thresholds; None for a built bank
    thresholds_predate_update: bool  # are its thresholds older than its last update (stale)
    n_centroids: int | None  # K, when the file records it

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (what ``ocbank history --json`` prints per version).

        The hash is ``bank_sha256`` there, as in every JSON that names a bank's bytes.
        """
        row = asdict(self)
        return {"bank_sha256": row.pop("sha256"), **row}


def history_dir(bank: str | os.PathLike[str]) -> Path:
    """The folder holding ``bank``'s earlier versions: ``<bank's folder>/history``."""
    return Path(bank).parent / HISTORY_DIR


def version_path(bank: str | os.PathLike[str], sha256: str) -> Path:
    """Where the version of ``bank`` with this sha256 is kept: ``history/<product>@<sha256 prefix>.h5``."""
    bank = Path(bank)
    return history_dir(bank) / f"{bank.stem}@{sha256[:SHA_PREFIX_CHARS]}{bank.suffix}"


def _history_files(bank: Path) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(bank.stem)}@[0-9a-f]{{{SHA_PREFIX_CHARS}}}{re.escape(bank.suffix)}$")
    folder = history_dir(bank)
    return sorted(p for p in folder.iterdir() if pattern.match(p.name)) if folder.is_dir() else []


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically (temp file, fsync, rename), keeping ``src``'s modification time."""
    def write(tmp: str) -> None:
        shutil.copyfile(src, tmp)
        st = os.stat(src)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))

    atomic_write(dst, write)


def archive(
    bank: str | os.PathLike[str], keep: int = DEFAULT_KEEP_HISTORY, source: str | os.PathLike[str] | None = None,
) -> Path | None:
    """Copy ``source`` (default: the bank file as it is now) into ``bank``'s history, then keep its ``keep`` newest versions.

    Returns the history file (None when ``source`` does not exist: nothing to keep). The caller
    holds the build lock of ``bank``'s folder; a version already kept is not copied again.
    """
    bank = Path(bank)
    source = Path(source) if source is not None else bank
    if not source.is_file():
        return None
    dst = version_path(bank, file_sha256(source))
    if not dst.is_file():
        _copy_atomic(source, dst)
    prune(bank, keep)
    return dst


def prune(bank: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest (by modification time) history files of ``bank``; return the deleted."""
    if keep < 1:
        msg = f"keep_history must be >= 1 (an update keeps at least its parent), got {keep}. Pass a number of versions."
        raise DataError(msg)
    files = sorted(_history_files(Path(bank)), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)
    return files[keep:]


def _iso(mtime: float) -> str:
    return datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(path: Path, current: bool) -> Version:
    """The :class:`Version` of one bank file (reads and validates it)."""
    record = read_record(path)
    last = record.last_update
    summary = record.build.summary or {}
    return Version(
        sha256=file_sha256(path),
        path=escape_path(path),
        time=last.get("time") or _iso(path.stat().st_mtime),
        current=current,
        images_added=last.get("images_added"),
        images_held=last.get("images_held"),
        recalibrated=last.get("recalibrated"),
        thresholds_predate_update=bool(record.thresholds_predate_update),
        n_centroids=summary.get("n_centroids"),
    )


def list_versions(bank: str | os.PathLike[str]) -> list[Version]:
    """The bank file (``current``) and its kept versions, newest first; the current one first on a tie.

    Raises DataError when ``bank`` does not exist and has no history either.
    """
    bank = Path(bank)
    versions = [describe(p, current=False) for p in _history_files(bank)]
    if bank.is_file():
        versions.append(describe(bank, current=True))
    elif not versions:
        msg = f"{bank} does not exist and has no history in {history_dir(bank)}. Pass the path of a bank file."
        raise DataError(msg)
    return sorted(versions, key=lambda v: (v.time, v.current), reverse=True)


def find_version(bank: str | os.PathLike[str], prefix: str) -> Path:
    """The history file of ``bank`` whose sha256 starts with ``prefix`` (hex, at least MIN_SHA_PREFIX characters).

    Raises VersionNotFoundError when none or several match, naming them.
    """
    bank = Path(bank)
    prefix = prefix.strip().lower()
    if len(prefix) < MIN_SHA_PREFIX or not re.fullmatch(r"[0-9a-f]+", prefix):
        msg = (f"--to must be a sha256 prefix of at least {MIN_SHA_PREFIX} hex digits, got {prefix!r}. "
               f"List the versions with: ocbank history --bank {escape_path(bank)}")
        raise VersionNotFoundError(msg)
    candidates = [p for p in _history_files(bank) if p.stem.split("@", 1)[1].startswith(prefix[:SHA_PREFIX_CHARS])]
    if len(prefix) > SHA_PREFIX_CHARS:
        candidates = [p for p in candidates if file_sha256(p).startswith(prefix)]
    if len(candidates) != 1:
        what = "no kept version" if not candidates else f"{len(candidates)} kept versions ({', '.join(p.name for p in candidates)})"
        msg = (f"{what} of {escape_path(bank)} has a sha256 starting with {prefix!r}. "
               f"List them with: ocbank history --bank {escape_path(bank)}")
        raise VersionNotFoundError(msg)
    return candidates[0]


def rollback(bank: str | os.PathLike[str], to: str, keep: int = DEFAULT_KEEP_HISTORY) -> dict[str, Any]:
    """Restore the kept version of ``bank`` whose sha256 starts with ``to``, atomically.

    Under the build lock of ``bank``'s folder: the current file is archived first (the
    version it replaced stays restorable), then the version is copied over ``bank`` (temp
    file, fsync, rename) and its bytes are checked against its sha256. Returns
    ``{"bank", "old_sha256", "new_sha256", "restored_from", "archived", "changed"}``; a
    version equal to the current file changes nothing (``changed`` False). Raises
    VersionNotFoundError (no or ambiguous match), BuildLockError (another writer).
    """
    bank = Path(bank)
    with build_lock(bank.parent):
        source = find_version(bank, to)
        new = file_sha256(source)
        old = file_sha256(bank) if bank.is_file() else None
        result: dict[str, Any] = {"bank": escape_path(bank), "old_sha256": old, "new_sha256": new,
                                  "restored_from": escape_path(source), "archived": None, "changed": old != new}
        if old == new:
            return result
        read_record(source)  # a damaged history file is refused by name before the bank is touched
        archived = archive(bank, keep)
        result["archived"] = escape_path(archived) if archived else None
        _copy_atomic(source, bank)
        got = file_sha256(bank)
        if got != new:  # the copy is checked, never assumed
            msg = f"restoring {source} gave {bank} the sha256 {got}, not {new}. Run the rollback again."
            raise DataError(msg)
        prune(bank, keep)
        return result
