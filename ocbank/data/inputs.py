"""What Detector takes as images: paths, PIL images, arrays, Samples, or a float tensor batch.

:func:`as_samples` turns one image or a sequence into samples for the loader;
:func:`tensor_batches` cuts a preprocessed tensor [N, 3, S, S] into loader-sized batches,
skipping (and naming) images outside the float-pixel rule as unreadable files are;
:class:`Inputs` holds either kind for a fit, taken by position.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, InputError, InputTypeError
from .datasets import Sample
from .images import check_unit_range, normalize
from .loader import Batch

ImageLike = Any  # a path, a PIL image, or an image array [H, W(, C)]


def _is_single_image(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike, Image.Image, Sample)) or (
        isinstance(images, np.ndarray) and images.dtype != object and images.ndim in (2, 3)
    )


def as_samples(images: Any) -> list[Sample]:
    """One image or a sequence of images (paths, PIL images, arrays, Samples) -> samples."""
    if _is_single_image(images):
        images = [images]
    if isinstance(images, (bytes, dict)) or not isinstance(images, (Sequence, np.ndarray)):
        msg = (
            f"images must be an image (path, PIL image, array) or a sequence of them, got {type(images).__name__}. "
            "Pass a list, or a float tensor [N, 3, S, S]."
        )
        raise InputTypeError(msg)
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Sample):
            out.append(im)
        elif isinstance(im, (str, os.PathLike, Image.Image, np.ndarray)):
            out.append(Sample(im))
        else:
            msg = f"images[{i}] is a {type(im).__name__}; each image must be a path, a PIL image or an array."
            raise InputTypeError(msg)
    return out


def _in_unit_range(part: torch.Tensor, offset: int) -> tuple[list[int], list[int]]:
    """Split a tensor batch [n, 3, S, S] by the float-pixel rule arrays and files follow
    (:func:`ocbank.data.images.check_unit_range`): (kept positions, skipped input indices).

    Each image outside the rule is skipped and named, as an unreadable file or array is.
    """
    flat = part.reshape(part.shape[0], -1)
    lows, highs = flat.amin(1).tolist(), flat.amax(1).tolist()  # NaN propagates into both
    keep, skipped = [], []
    for i, (lo, hi) in enumerate(zip(lows, highs, strict=True)):
        try:
            check_unit_range(lo, hi, f"tensor[{offset + i}]")
            keep.append(i)
        except DataError as exc:
            warnings.warn(f"skipping image: {exc}", stacklevel=3)
            skipped.append(offset + i)
    return keep, skipped


@dataclass(frozen=True)
class Inputs:
    """Training inputs as either samples or a preprocessed tensor [N, 3, S, S], taken by index."""

    samples: list[Sample] | None = None
    tensor: torch.Tensor | None = None

    @classmethod
    def of(cls, images: Any) -> Inputs:
        return cls(tensor=images) if isinstance(images, torch.Tensor) else cls(samples=as_samples(images))

    def __len__(self) -> int:
        return self.tensor.shape[0] if self.tensor is not None else len(self.samples or [])

    def take(self, idx: list[int]) -> Any:
        if self.tensor is not None:
            return self.tensor[torch.as_tensor(idx, dtype=torch.long)]
        return [self.samples[i] for i in idx]

    def name(self, i: int) -> str:
        if self.tensor is not None:
            return f"tensor[{i}]"
        path = self.samples[i].path  # a file by its path, an in-memory image by its position
        return str(path) if isinstance(path, (str, bytes, os.PathLike)) else f"images[{i}]"


def tensor_batches(batch: torch.Tensor, image_size: int, batch_size: int) -> Iterator[Batch]:
    """A preprocessed float tensor [N, 3, S, S] (RGB in [0, 1], S = ``image_size``) in loader-sized pieces."""
    size = image_size
    if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != (size, size):
        msg = f"a tensor batch must be [N, 3, {size}, {size}] (RGB in [0, 1], resized and cropped), got {tuple(batch.shape)}."
        raise InputError(msg)
    if not batch.is_floating_point():
        msg = f"a tensor batch must be floating point RGB in [0, 1], got dtype {batch.dtype}. Divide uint8 by 255."
        raise InputTypeError(msg)
    for lo in range(0, batch.shape[0], batch_size):
        part = batch[lo : lo + batch_size].float()
        keep, skipped = _in_unit_range(part, lo)
        if skipped:
            part = part[keep]  # indexing with a list copies: only when something was left out
        part = part.contiguous()  # one memory layout, one conv kernel
        rgb = (part.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        yield Batch([lo + i for i in keep], skipped, normalize(part), rgb)


__all__ = ["ImageLike", "Inputs", "as_samples", "tensor_batches"]
