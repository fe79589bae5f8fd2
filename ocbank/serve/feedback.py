"""Operator feedback: images an operator labelled OK or NG, kept durably until a learn absorbs them.

Each image is stored under ``<banks>/feedback/<product>/`` as ``<id><suffix>``, where ``id``
is the sha256 of its bytes (so a retried request is the same file, never a duplicate),
beside a JSON sidecar ``<id>.json``: the label, when it came, the score, normalized score
and label the service gave it, and the bank's sha256 that scored it. The image is written
before its sidecar, each atomically (temp file, fsync, rename): a sidecar always has its
image, and an image without a sidecar (a crash between the two) is ignored until the
request is retried.

A learn (:mod:`ocbank.serve.learn`) marks each sidecar it settled, atomically:
``absorbed_into`` (the bank version that absorbed the image) or ``held_back`` (the gate
refused it; it is never absorbed).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ..engine.checkpoint import atomic_write
from ..jsonio import write_json
from .api import ApiError

FEEDBACK_DIR = "feedback"
FEEDBACK_LABELS = ("OK", "NG")
SIDECAR_SUFFIX = ".json"
_MAGIC = (  # leading bytes -> the suffix the image is stored with (readers pick a decoder by it)
    (b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"),
)


def feedback_dir(banks: str | os.PathLike[str], product: str) -> Path:
    return Path(banks) / FEEDBACK_DIR / product


def check_label(label: str | None) -> str:
    """``?label=`` -> "OK" or "NG" (case-insensitive); anything else is a 400 naming it."""
    value = (label or "").strip().upper()
    if value not in FEEDBACK_LABELS:
        raise ApiError(400, "bad_request", f"label must be OK or NG, got {label!r}. Send ?label=OK or ?label=NG.")
    return value


def image_suffix(body: bytes) -> str:
    for magic, suffix in _MAGIC:
        if body.startswith(magic):
            return suffix
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return ".webp"
    return ".img"


def _read(sidecar: Path) -> dict[str, Any] | None:
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def store(banks: str | os.PathLike[str], product: str, body: bytes, label: str, scored: dict[str, Any]) -> dict[str, Any]:
    """Keep ``body`` (an image already decoded once) as feedback ``label`` for ``product``; return its record.

    ``scored``: what the service answered for it (``score``, ``normalized``, ``label``,
    ``bank_sha256``). The record says ``stored`` (a new image), or ``duplicate`` (the same
    bytes with the same label: nothing written). A pending image may be relabelled; one a
    learn already settled answers 409.
    """
    folder = feedback_dir(banks, product)
    folder.mkdir(parents=True, exist_ok=True)
    fid = hashlib.sha256(body).hexdigest()
    sidecar = folder / f"{fid}{SIDECAR_SUFFIX}"
    old = _read(sidecar)
    if old is not None:
        if old.get("label") == label:
            return {**old, "status": "duplicate"}
        settled = old.get("absorbed_into") or old.get("held_back")
        if settled:
            msg = (f"feedback {fid} is already settled as {old.get('label')} ({'absorbed into ' + str(old['absorbed_into']) if old.get('absorbed_into') else 'held back by the gate'}), "
                   f"so it cannot become {label}. Roll the bank back to undo a learn.")
            raise ApiError(409, "feedback_settled", msg)
        record = {**old, "label": label, "relabelled_at": _now()}
        write_json(sidecar, record)
        return {**record, "status": "relabelled"}
    image = folder / f"{fid}{image_suffix(body)}"

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(body)

    atomic_write(image, write)
    record = {
        "id": fid,
        "file": image.name,
        "label": label,
        "time": _now(),
        "score": scored.get("score"),
        "normalized": scored.get("normalized"),
        "service_label": scored.get("label"),
        "bank_sha256": scored.get("bank_sha256"),
        "absorbed_into": None,
        "held_back": None,
    }
    write_json(sidecar, record)  # last: the sidecar is what makes the image count
    return {**record, "status": "stored"}


def records(banks: str | os.PathLike[str], product: str) -> list[dict[str, Any]]:
    """Every readable sidecar of ``product`` whose image is present, oldest first."""
    folder = feedback_dir(banks, product)
    if not folder.is_dir():
        return []
    out = []
    for sidecar in folder.glob(f"*{SIDECAR_SUFFIX}"):
        record = _read(sidecar)
        if record is None or record.get("id") != sidecar.stem or not (folder / str(record.get("file"))).is_file():
            continue  # not a feedback sidecar (learn.json), or its image is gone
        out.append(record)
    return sorted(out, key=lambda r: (str(r.get("time")), r["id"]))


def pending(banks: str | os.PathLike[str], product: str) -> list[dict[str, Any]]:
    """OK feedback that no learn has settled yet: what the next learn offers the gate."""
    return [r for r in records(banks, product)
            if r.get("label") == "OK" and not r.get("absorbed_into") and not r.get("held_back")]


def image_path(banks: str | os.PathLike[str], product: str, record: dict[str, Any]) -> Path:
    return feedback_dir(banks, product) / str(record["file"])


def mark(banks: str | os.PathLike[str], product: str, fid: str, **fields: Any) -> None:
    """Rewrite feedback ``fid``'s sidecar with ``fields`` added, atomically (a no-op when it is gone)."""
    sidecar = feedback_dir(banks, product) / f"{fid}{SIDECAR_SUFFIX}"
    record = _read(sidecar)
    if record is not None:
        write_json(sidecar, {**record, **fields})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
