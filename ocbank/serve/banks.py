"""The bank files a server serves: found in a folder, validated from their bytes, named by their hash.

A bank is identified by the sha256 of its file's bytes (``bank_sha256`` in every
response). Validation reads those exact bytes, so a file rewritten while it is being
checked can never be served half-validated: the checksum of the means, counts and
second moments, the detector config in its metadata, and the dimensions the backbone
gives (:func:`ocbank.model.record.open_bank`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import check_class_name
from ..data import NAME_MAX
from ..data.images import Transform, open_regular
from ..engine.checkpoint import BANK_SUFFIX, bank_file_path, is_checkpoint_name
from ..errors import CheckpointError, ConfigError, DataError
from ..model.record import open_bank

log = logging.getLogger(__name__)


def valid_product(name: str) -> bool:
    """A served product is a class: its name follows :func:`ocbank.config.check_class_name`,
    its bank's file name fits in a file name (:data:`ocbank.data.NAME_MAX` bytes), and a
    build's checkpoint name (``<class>.partial``) is never one."""
    try:
        check_class_name(name)
    except ConfigError:
        return False
    file_name = bank_file_path("", name).name
    return len(os.fsencode(file_name)) <= NAME_MAX and not is_checkpoint_name(file_name)


def bank_path(folder: str | os.PathLike[str], product: str) -> Path:
    return bank_file_path(folder, product)


def is_bank_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (links followed); any error (a name too long, a loop) is a no."""
    try:
        return path.is_file()
    except OSError:
        return False


def read_bank_bytes(path: Path) -> bytes:
    """The bytes of the bank file ``path``: a regular file only, never blocking on a FIFO or device."""
    with open_regular(path) as fh:
        return fh.read()


def _not_served(path: Path) -> str | None:
    """Why the ``*.h5`` file ``path`` is not served, or None when it is."""
    if is_checkpoint_name(path):
        return "an unfinished build checkpoint (finish it with ocbank build --resume)"
    if not is_bank_file(path):
        return "not a regular file"
    try:
        check_class_name(path.name[: -len(BANK_SUFFIX)], where="its product name")
    except ConfigError as exc:
        return str(exc)
    return None


def list_banks(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """``<product>.h5`` files of ``folder`` by product name; each other ``*.h5`` file is named in a warning."""
    root = Path(folder)
    if not root.is_dir():
        msg = f"--banks {str(root)!r} is not a folder. Give the folder that holds <product>.h5 bank files."
        raise DataError(msg)
    found = {}
    for path in sorted(root.glob(f"*{BANK_SUFFIX}")):
        why = _not_served(path)
        if why is None:
            found[path.name[: -len(BANK_SUFFIX)]] = path
        else:
            log.warning("not serving %s: %s", path, why)
    if not found:
        msg = f"no <product>.h5 bank files in {str(root)!r}. Build banks there with `ocbank build --out {root}`."
        raise DataError(msg)
    return found


@dataclass(frozen=True)
class BankInfo:
    """What the API says about one validated bank file (its bytes travel separately)."""

    product: str
    path: str
    sha256: str  # of the file's bytes
    n_centroids: int
    dim: int
    radius: float
    resize: int
    crop: int | None
    image_size: int  # S: the crop, or the resize when there is none
    decision: dict[str, Any] | None  # the calibrated thresholds, None when uncalibrated
    stale: bool = False  # the thresholds predate the bank's last update (thresholds_predate_update)
    loaded_at: float = field(default_factory=time.time)

    @property
    def model_id(self) -> str:
        """The replicas' key for this exact file: product and content hash."""
        return f"{self.product}@{self.sha256}"

    @property
    def transform(self) -> Transform:
        return Transform(self.resize, self.crop)

    def describe(self) -> dict[str, Any]:
        thresholds = None
        if self.decision is not None:
            thresholds = {k: self.decision.get(k) for k in ("image_threshold", "pixel_threshold", "false_alarm_rate")}
        return {
            "bank_sha256": self.sha256,
            "path": self.path,
            "n_centroids": self.n_centroids,
            "radius": self.radius,
            "image_size": self.image_size,
            "thresholds": thresholds,
            "calibrated": self.decision is not None,
            "thresholds_predate_update": self.stale,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
        }


def validate_bank(product: str, data: bytes, where: str) -> BankInfo:
    """Bank file bytes -> BankInfo, or CheckpointError naming ``where`` and the problem.

    The checks a replica's load runs (:func:`ocbank.model.record.open_bank`), an unfinished
    build checkpoint refused, on one read of these exact bytes.
    """
    with tempfile.NamedTemporaryFile(suffix=BANK_SUFFIX) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            opened = open_bank(tmp.name, where=where)
        except (CheckpointError, ConfigError, DataError) as exc:
            raise CheckpointError(str(exc)) from None
    state, record = opened.state, opened.record
    cfg = record.config
    return BankInfo(
        product=product,
        path=where,
        sha256=hashlib.sha256(data).hexdigest(),
        n_centroids=int(state.means.shape[0]),
        dim=state.dim,
        radius=float(state.radius),
        resize=cfg.data.resize,
        crop=cfg.data.crop,
        image_size=cfg.image_size,
        decision=None if record.decision is None else record.decision.to_dict(),
        stale=bool(record.thresholds_predate_update),
    )
