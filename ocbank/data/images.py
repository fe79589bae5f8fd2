"""Reading images and masks, and the resize/crop/normalise transform."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


