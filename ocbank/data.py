"""Datasets: MVTec AD, Real-IAD and plain folders, with tolerant image loading."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .config import Config

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset that cannot be used; the message names the path and the fix."""


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


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# ---------------------------------------------------------------------- layouts
def mvtec_classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def mvtec_split(root: Path, name: str) -> ClassSplit:
    """``<root>/<class>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``."""
    base = root / name
    if not base.is_dir():
        msg = f"MVTec class folder {base} does not exist. Check data.root and data.classes."
        raise DataError(msg)
    train = [Sample(str(p)) for p in _images_in(base / "train" / "good")]
    test: list[Sample] = []
    test_dir = base / "test"
    if test_dir.is_dir():
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for img in _images_in(defect_dir):
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
    return ClassSplit(root.name, [Sample(str(p)) for p in _images_in(root)], [])


def class_names(cfg: Config) -> list[str]:
    root = Path(cfg.data["root"])
    fmt = cfg.data["format"]
    if fmt == "folder":
        return [root.name]
    available = mvtec_classes(root) if fmt == "mvtec" else realiad_classes(root, cfg.data["json_dir"])
    wanted = cfg.data["classes"]
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
    root = Path(cfg.data["root"])
    fmt = cfg.data["format"]
    if fmt == "mvtec":
        split = mvtec_split(root, name)
    elif fmt == "realiad":
        split = realiad_split(root, name, cfg.data["json_dir"], cfg.data["image_dir"])
    else:
        split = folder_split(root)
    return split


# ---------------------------------------------------------------------- loading
@dataclass
class Transform:
    """Resize to a ``resize`` x ``resize`` square, then center crop to ``crop`` (if set)."""

    resize: int
    crop: int | None

    @property
    def size(self) -> int:
        return self.crop or self.resize

    def _geometry(self, img: Image.Image, resample: int) -> Image.Image:
        img = img.resize((self.resize, self.resize), resample)
        if self.crop and self.crop < self.resize:
            off = (self.resize - self.crop) // 2
            img = img.crop((off, off, off + self.crop, off + self.crop))
        return img

    def image(self, img: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
        """PIL image -> (normalised tensor [3, S, S], uint8 RGB [S, S, 3] for overlays)."""
        rgb = np.asarray(self._geometry(img.convert("RGB"), Image.BILINEAR), dtype=np.uint8)
        t = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        return (t - mean) / std, rgb

    def mask(self, mask: Image.Image, image_size: tuple[int, int], where: str) -> np.ndarray:
        """Binary mask uint8 [S, S]; resized with nearest neighbour if its size differs."""
        if mask.size != image_size:
            log.warning("mask %s is %s but its image is %s: resized (nearest)", where, mask.size, image_size)
            mask = mask.resize(image_size, Image.NEAREST)
        return (np.asarray(self._geometry(mask.convert("L"), Image.NEAREST)) > 127).astype(np.uint8)


def open_image(source: Any) -> Image.Image:
    """Path, PIL image or uint8 array [H, W] / [H, W, 3] -> PIL image (fully decoded)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            msg = f"image arrays must be uint8 [H, W] or [H, W, 3], got {source.dtype} {source.shape}."
            raise ValueError(msg)
        return Image.fromarray(source)
    with Image.open(source) as img:
        img.load()
        return img.copy()


class ImageDataset(Dataset):
    """Samples -> dicts with ``image``, ``rgb``, ``mask``, ``index``; ``None`` for unreadable images."""

    def __init__(self, samples: Sequence[Sample], transform: Transform, with_masks: bool = False):
        self.samples = list(samples)
        self.transform = transform
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        sample = self.samples[index]
        try:
            img = open_image(sample.path)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            warnings.warn(f"skipping unreadable image {sample.path}: {exc}", stacklevel=1)
            return {"index": index, "skipped": True}
        tensor, rgb = self.transform.image(img)
        item: dict[str, Any] = {"index": index, "skipped": False, "image": tensor, "rgb": rgb}
        if self.with_masks:
            size = self.transform.size
            mask = np.zeros((size, size), dtype=np.uint8)
            if sample.mask:
                try:
                    mask = self.transform.mask(open_image(sample.mask), img.size, sample.mask)
                except (OSError, UnidentifiedImageError) as exc:
                    warnings.warn(f"unreadable mask {sample.mask} for {sample.path}: {exc}; image skipped", stacklevel=1)
                    return {"index": index, "skipped": True}
            elif sample.label == 1:
                warnings.warn(f"anomalous image {sample.path} has no mask: counted as all-normal pixels", stacklevel=1)
            item["mask"] = mask
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [it for it in items if not it["skipped"]]
    batch: dict[str, Any] = {
        "index": [it["index"] for it in good],
        "skipped": [it["index"] for it in items if it["skipped"]],
    }
    if good:
        batch["image"] = torch.stack([it["image"] for it in good])
        batch["rgb"] = np.stack([it["rgb"] for it in good])
        if "mask" in good[0]:
            batch["mask"] = np.stack([it["mask"] for it in good])
    return batch


def _worker_init(_: int) -> None:
    # The notes' fork-after-faiss deadlock: keep workers single-threaded.
    torch.set_num_threads(1)


def make_loader(samples: Sequence[Sample], cfg: Config, with_masks: bool = False) -> DataLoader:
    """Ordered loader (no shuffling: the stream order is part of the bank's identity)."""
    workers = int(cfg.data["num_workers"])
    return DataLoader(
        ImageDataset(samples, Transform(cfg.data["resize"], cfg.data["crop"]), with_masks),
        batch_size=int(cfg.data["batch_size"]),
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if workers else None,
        # spawn, not fork: forking after faiss/OpenMP use can deadlock.
        multiprocessing_context="spawn" if workers else None,
        persistent_workers=False,
    )
