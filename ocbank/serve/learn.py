"""A learn: the OK feedback of one product, through the gated update, into a new bank version.

It runs as a Ray task (never in a serving replica): :func:`learn` is the task's body.
Its journal ``<banks>/feedback/<product>/learn.json`` (written atomically at each step)
makes every crash recoverable, and every feedback image absorbed exactly once:

1. ``running``: written before the update, with the parent bank's sha256 and the
   feedback ids offered to the gate.
2. The gated update writes the new version (atomically, its parent kept in history).
3. ``marking``: the new sha256 and which ids were absorbed and which held back.
4. Each sidecar is marked (``absorbed_into`` / ``held_back``), atomically, one by one.
5. ``learned``.

A crash before 2 leaves the bank as it was and the feedback pending (the journal's
parent is still the bank). A crash between 2 and 3 leaves a new bank whose lineage names
the journal's parent: the next learn re-derives the gate's decisions by a dry run of the
same candidates against that parent (the gate is a function of the parent and the image)
and marks them. A crash during 4 is finished from the journal. Only then are new
feedback images offered, so none is absorbed twice and none is lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..data import escape_path
from ..engine.threads import set_compute_threads
from ..errors import BuildLockError, OcbankError
from ..jobs.lock import build_lock
from ..jsonio import write_json
from ..model.features import file_sha256
from ..model.record import read_record
from .banks import bank_path
from .feedback import feedback_dir, image_path, mark, pending, records

log = logging.getLogger(__name__)

LEARN_JOURNAL = "learn.json"
LOCK_WAIT_S = 600.0  # a learn waits this long for another writer of the banks folder (build, update, rollback)
LOCK_POLL_S = 1.0


def journal_path(banks: str | os.PathLike[str], product: str) -> Path:
    return feedback_dir(banks, product) / LEARN_JOURNAL


def read_journal(banks: str | os.PathLike[str], product: str) -> dict[str, Any] | None:
    try:
        return json.loads(journal_path(banks, product).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _journal(banks: str, product: str, record: dict[str, Any]) -> dict[str, Any]:
    write_json(journal_path(banks, product), record)
    return record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def gated_update(bank: Path, files: list[Path], *, dry_run: bool = False,
                 max_new_centroids: float | None = None) -> dict[str, Any]:
    """The gated update of ``bank`` with ``files`` in place (``gate auto``; the parent kept in history).

    Returns ``{"absorbed": [paths], "held_back": [{"file", "score"}], "summary": ...}``, each path
    escaped as the update reports it (:func:`ocbank.data.escape_path`); an image that could not be
    read counts as held back (score None), so that no learn offers it again.
    """
    from ..jobs.update import UpdateJob, update_bank  # noqa: PLC0415

    extra = {} if max_new_centroids is None else {"max_new_centroids": max_new_centroids}
    summary = update_bank(UpdateJob(bank=str(bank), inputs=tuple(str(f) for f in files), out=str(bank),
                                    dry_run=dry_run, **extra))
    held = [{"file": h["image"], "score": h["score"]} for h in summary["held_back"]]
    held += [{"file": name, "score": None} for name in summary["unreadable"]]
    return {"absorbed": [a["image"] for a in summary["absorbed"]], "held_back": held, "summary": summary}


def _settle(banks: str, product: str, entry: dict[str, Any]) -> None:
    """Mark the sidecars the journal ``entry`` (state marking) names; idempotent."""
    for fid in entry["absorbed"]:
        mark(banks, product, fid, absorbed_into=entry["new_sha256"], settled_at=entry["finished"])
    for held in entry["held_back"]:
        mark(banks, product, held["id"], held_back={"score": held.get("score"), "parent_sha256": entry["old_sha256"]},
             settled_at=entry["finished"])


def _decide(banks: str, product: str, result: dict[str, Any], by_file: dict[str, str]) -> tuple[list[str], list[dict[str, Any]]]:
    """The gate's split of ``result`` as feedback ids (``by_file``: escaped image path -> id)."""
    absorbed = [by_file[name] for name in result["absorbed"] if name in by_file]
    held = [{"id": by_file[h["file"]], "score": h.get("score")} for h in result["held_back"] if h["file"] in by_file]
    return absorbed, held


def recover(banks: str, product: str) -> dict[str, Any] | None:
    """Finish or close the journal of a learn that did not end; return what it found (None: nothing to do)."""
    entry = read_journal(banks, product)
    if entry is None or entry.get("state") not in ("running", "marking"):
        return None
    bank = bank_path(banks, product)
    if entry["state"] == "running":
        current = file_sha256(bank)
        last = read_record(bank).last_update
        if current == entry["old_sha256"] or last.get("parent_sha256") != entry["old_sha256"]:
            # Nothing was written (or someone else wrote the bank): the candidates are still pending.
            return _journal(banks, product, {**entry, "state": "interrupted", "finished": _now(),
                                             "error": "the learn stopped before it wrote a new version; nothing was absorbed."})
        # The new version landed; its gate decisions are re-derived against the parent it names.
        offered = [r for r in records(banks, product) if r["id"] in entry["candidates"]]
        by_file = {escape_path(image_path(banks, product, r)): r["id"] for r in offered}
        parent = _parent_version(bank, entry["old_sha256"])
        result = gated_update(parent, [image_path(banks, product, r) for r in offered], dry_run=True,
                              max_new_centroids=entry.get("max_new_centroids"))
        absorbed, held = _decide(banks, product, result, by_file)
        entry = {**entry, "state": "marking", "new_sha256": current, "absorbed": absorbed, "held_back": held,
                 "finished": _now()}
        _journal(banks, product, entry)
    _settle(banks, product, entry)
    return _journal(banks, product, {**entry, "state": "learned", "recovered": True})


def _parent_version(bank: Path, sha256: str) -> Path:
    from ..jobs import versions  # noqa: PLC0415

    return versions.find_version(bank, sha256)


def _wait_for_lock(folder: Path, deadline: float) -> Any:
    """The product's learn lock (one learn per product, across processes), waiting up to the deadline."""
    while True:
        lock = build_lock(folder)
        try:
            lock.__enter__()
            return lock
        except BuildLockError:
            if time.monotonic() > deadline:
                raise
            time.sleep(LOCK_POLL_S)


def learn(banks: str, product: str, max_new_centroids: float | None = None, threads: int = 1) -> dict[str, Any]:
    """Absorb ``product``'s pending OK feedback through the gated update; return the journal's last entry.

    The task's body: it holds the product's learn lock, finishes an interrupted learn first
    (:func:`recover`), then learns what is pending. The bank file is replaced atomically by
    the update; the caller reloads it.
    """
    callers = set_compute_threads(threads)
    try:
        return _learn(banks, product, max_new_centroids)
    finally:
        set_compute_threads(callers)  # a process-wide setting: the caller's (a test's, a worker's) comes back


def _learn(banks: str, product: str, max_new_centroids: float | None) -> dict[str, Any]:
    """:func:`learn`'s body, at the thread count it set."""
    began = time.perf_counter()
    deadline = time.monotonic() + LOCK_WAIT_S
    folder = feedback_dir(banks, product)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _wait_for_lock(folder, deadline)
    try:
        recovered = recover(banks, product)
        todo = pending(banks, product)
        bank = bank_path(banks, product)
        parent = file_sha256(bank)
        entry: dict[str, Any] = {
            "product": product, "state": "running", "pid": os.getpid(), "started": _now(), "old_sha256": parent,
            "candidates": [r["id"] for r in todo], "recovered_before": bool(recovered),
            "max_new_centroids": max_new_centroids,
        }
        if not todo:
            entry.update(state="learned", new_sha256=parent, absorbed=[], held_back=[], finished=_now(),
                         note="no OK feedback was waiting: the bank is unchanged.")
            return _journal(banks, product, {**entry, "seconds": round(time.perf_counter() - began, 3)})
        _journal(banks, product, entry)
        files = [image_path(banks, product, r) for r in todo]
        by_file = {escape_path(f): r["id"] for f, r in zip(files, todo)}
        while True:
            try:
                result = gated_update(bank, files, max_new_centroids=max_new_centroids)
                break
            except BuildLockError:  # a build, update or rollback of another product holds the folder
                if time.monotonic() > deadline:
                    raise
                time.sleep(LOCK_POLL_S)
        absorbed, held = _decide(banks, product, result, by_file)
        entry.update(state="marking", new_sha256=file_sha256(bank), absorbed=absorbed, held_back=held, finished=_now(),
                     summary=result.get("summary", {}))
        _journal(banks, product, entry)
        _settle(banks, product, entry)
        entry.update(state="learned", seconds=round(time.perf_counter() - began, 3))
        return _journal(banks, product, entry)
    except OcbankError as exc:
        journal = read_journal(banks, product) or {}
        unchanged = journal.get("old_sha256") == file_sha256(bank_path(banks, product))
        if journal.get("state") == "running" and journal.get("pid") == os.getpid() and unchanged:
            # Refused before anything was written (the growth guard, no threshold to gate on): close the journal.
            _journal(banks, product, {**journal, "state": "failed", "finished": _now(), "error": " ".join(str(exc).split())})
        raise
    finally:
        lock.__exit__(None, None, None)
