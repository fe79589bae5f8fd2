"""Dataset layouts: MVTec AD, Real-IAD and plain folders, as lists of samples."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DataError
from .images import IMAGE_SUFFIXES, file_kind


@dataclass(frozen=True)
class Sample:
    """One image of a split. ``label`` is 0 (normal), 1 (anomalous) or -1 (unknown)."""

    path: str
    label: int = 0
    mask: str | None = None
    defect: str = "good"


@dataclass
class ClassSplit:
    name: str
    train: list[Sample]
    test: list[Sample] = field(default_factory=list)


# ---------------------------------------------------------------------- file names
NAME_MAX = 255  # bytes in one file name (ext4, XFS, APFS, NTFS): derived output names are cut to fit
_ESCAPED = re.compile(rb"\\(\\|x[0-9a-f]{2})")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def escape_path(path: str | os.PathLike[str]) -> str:
    """A file name as text that every UTF-8 reader takes, reversibly (:func:`unescape_path`).

    Names from the file system may hold bytes that are not UTF-8 (Latin-1 names from old
    cameras and Windows shares; Python keeps them as surrogates, which no UTF-8 file can
    hold). Each such byte, and each control character (newline, tab, escape: they would
    break a CSV row, a log line or a terminal), is written ``\\xNN`` and each backslash
    ``\\\\``; any other name is unchanged. scores.csv, build_summary.json, the report,
    the update lineage, warnings and printed results use it.
    """
    raw = _CONTROL.sub(lambda m: b"\\x%02x" % m.group()[0], os.fsencode(path).replace(b"\\", b"\\\\"))
    return raw.decode("utf-8", "backslashreplace")


def unescape_path(text: str) -> str:
    """The file name :func:`escape_path` wrote as ``text``, byte for byte."""

    def byte(m: re.Match[bytes]) -> bytes:
        return b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)])

    return os.fsdecode(_ESCAPED.sub(byte, text.encode("utf-8")))


def fit_name(stem: str, suffix: str) -> str:
    """``stem + suffix`` cut (at a character) so the name fits in :data:`NAME_MAX` bytes."""
    room = NAME_MAX - len(os.fsencode(suffix))
    kept, used = [], 0
    for ch in stem:
        size = len(os.fsencode(ch))
        if used + size > room:
            break
        kept.append(ch)
        used += size
    return "".join(kept) + suffix


# ---------------------------------------------------------------------- listing files
def ignored_name(name: str) -> bool:
    """Files and folders that every file browser hides: dot-names (macOS ``._x.png`` resource
    forks, ``.DS_Store``, ``.git``) and the ``__MACOSX`` folder that zip tools write."""
    return name.startswith(".") or name == "__MACOSX"


def images_in(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, by suffix), sorted.

    Symlinked sub-folders are followed, each real folder once (a link loop ends there).
    A link that points nowhere, and a FIFO, socket or device with an image's name, is
    listed, so that reading it fails (the reader opens regular files only, and never
    opens these) and is counted like any unreadable image. Names that :func:`ignored_name`
    hides are skipped.
    """
    found: list[Path] = []
    seen: set[str] = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not ignored_name(d)]
        found += [Path(top, n) for n in names if not ignored_name(n) and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def list_inputs(inputs: list[str]) -> list[Path]:
    """Image files and folders (searched with :func:`images_in`) -> files, in the order given."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += images_in(p)
        elif p.is_file():
            files.append(p)
        else:
            try:
                why = f"is {file_kind(p.stat().st_mode)}, not an image file or folder"
            except OSError:
                why = "does not exist"
            msg = f"input {str(p)!r} {why}. Pass image files or folders."
            raise DataError(msg)
    if not files:
        msg = f"no images found in {inputs!r}. Supported suffixes: {sorted(IMAGE_SUFFIXES)}."
        raise DataError(msg)
    return files


def calibration_images(folder: str | Path) -> list[Sample]:
    """The normal images of a calibration folder (recursively), refused by name when there are none."""
    p = Path(folder)
    if not p.is_dir():
        msg = f"calibration folder {p} does not exist. Pass a folder of normal images of this product."
        raise DataError(msg)
    files = images_in(p)
    if not files:
        msg = f"no images found in the calibration folder {p}. Supported suffixes: {sorted(IMAGE_SUFFIXES)}."
        raise DataError(msg)
    return [Sample(str(f)) for f in files]


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class SharedImage:
    """An image of one list that is also in another: ``path``, the ``match`` there and ``how`` they are the same."""

    path: str
    match: str
    how: str  # "same file" (one resolved path) or "same content" (equal SHA-256: a copy)

    def __str__(self) -> str:
        return f"{escape_path(self.path)} ({self.how} as {escape_path(self.match)})"


def shared_images(candidates: Sequence[Sample], pool: Sequence[Sample]) -> list[SharedImage]:
    """The files of ``candidates`` that are also in ``pool``, by resolved path or else by content.

    A file in both lists under one resolved path is the same file; a file whose SHA-256 equals
    one in ``pool`` is a copy of it. Only files whose size matches a pool file's are hashed, so
    a check against a large training list reads little. In-memory images are not compared.
    """

    def files(samples: Sequence[Sample]) -> list[Path]:
        return [Path(s.path) for s in samples if isinstance(s.path, (str, os.PathLike)) and Path(s.path).is_file()]

    pool_files = files(pool)
    by_path = {p.resolve(): p for p in pool_files}
    by_size: dict[int, list[Path]] = {}
    for p in pool_files:
        by_size.setdefault(p.stat().st_size, []).append(p)
    digests: dict[Path, str] = {}

    def digest(p: Path) -> str:
        if p not in digests:
            digests[p] = file_sha256(p)
        return digests[p]

    found: list[SharedImage] = []
    for p in files(candidates):
        if p.resolve() in by_path:
            found.append(SharedImage(str(p), str(by_path[p.resolve()]), "same file"))
            continue
        copy = next((q for q in by_size.get(p.stat().st_size, []) if digest(q) == digest(p)), None)
        if copy is not None:
            found.append(SharedImage(str(p), str(copy), "same content"))
    return found


# ---------------------------------------------------------------------- layouts
def mvtec_classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def mvtec_split(root: Path, name: str) -> ClassSplit:
    """``<root>/<class>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``."""
    base = root / name
    if not base.is_dir():
        msg = f"MVTec class folder {base} does not exist. Check data.root and data.classes."
        raise DataError(msg)
    train = [Sample(str(p)) for p in images_in(base / "train" / "good")]
    test: list[Sample] = []
    test_dir = base / "test"
    if test_dir.is_dir():
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for img in images_in(defect_dir):
                if defect == "good":
                    test.append(Sample(str(img)))
                    continue
                mask = base / "ground_truth" / defect / f"{img.stem}_mask.png"
                test.append(Sample(str(img), 1, str(mask) if mask.is_file() else None, defect))
    return ClassSplit(name, train, test)


def realiad_classes(root: Path, json_dir: str) -> list[str]:
    folder = root / json_dir
    if not folder.is_dir():
        msg = f"Real-IAD split folder {folder} does not exist. Set data.json_dir (relative to data.root)."
        raise DataError(msg)
    return sorted(p.stem for p in folder.glob("*.json"))


def realiad_split(root: Path, name: str, json_dir: str, image_dir: str) -> ClassSplit:
    """Splits from ``<root>/<json_dir>/<class>.json``; images under ``<root>/<image_dir>/<class>/``."""
    split_file = root / json_dir / f"{name}.json"
    if not split_file.is_file():
        msg = f"Real-IAD split file {split_file} does not exist. Check data.classes and data.json_dir."
        raise DataError(msg)
    try:
        spec = json.loads(split_file.read_text(encoding="utf-8"))
        entries = {part: list(spec[part]) for part in ("train", "test")}
    except (ValueError, KeyError, TypeError) as exc:
        msg = f"{split_file} is not a Real-IAD split (a JSON object with 'train' and 'test' lists): {exc}."
        raise DataError(msg) from exc
    base = root / image_dir / name

    def sample(entry: dict[str, Any]) -> Sample:
        try:
            label = 0 if entry["anomaly_class"] == "OK" else 1
            mask = entry.get("mask_path")
            return Sample(
                str(base / entry["image_path"]), label, str(base / mask) if mask else None, str(entry["anomaly_class"])
            )
        except (KeyError, TypeError) as exc:
            msg = f"{split_file}: an entry lacks image_path/anomaly_class ({entry!r})."
            raise DataError(msg) from exc

    train = [sample(e) for e in entries["train"]]
    test = [sample(e) for e in entries["test"]]
    return ClassSplit(name, [s for s in train if s.label == 0], test)


def folder_split(root: Path) -> ClassSplit:
    """A folder of normal images to build from (recursively); nothing to evaluate."""
    return ClassSplit(root.name, [Sample(str(p)) for p in images_in(root)], [])


def class_names(cfg: Config) -> list[str]:
    root = Path(cfg.data.root)
    fmt = cfg.data.format
    if fmt == "folder":
        return [root.name]
    available = mvtec_classes(root) if fmt == "mvtec" else realiad_classes(root, cfg.data.json_dir)
    wanted = cfg.data.classes
    if wanted == "all":
        if not available:
            msg = f"no classes found under {root} for data.format={fmt!r}. Check data.root and data.format."
            raise DataError(msg)
        return available
    missing = [c for c in wanted if c not in available]
    if missing:
        msg = f"class(es) {missing} not found under {root}; available: {available}. Fix data.classes or --classes."
        raise DataError(msg)
    return list(wanted)


def load_split(cfg: Config, name: str) -> ClassSplit:
    root = Path(cfg.data.root)
    fmt = cfg.data.format
    if fmt == "mvtec":
        split = mvtec_split(root, name)
    elif fmt == "realiad":
        split = realiad_split(root, name, cfg.data.json_dir, cfg.data.image_dir)
    else:
        split = folder_split(root)
    return split
