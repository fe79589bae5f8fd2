"""ocbank's resize and center crop for anomalib: the training/eval transform (PIL, as ocbank reads
images) and its exportable twin (matrix products), inside an anomalib PreProcessor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from anomalib.pre_processing import PreProcessor
from PIL import Image
from torch import nn

from ...data import Transform
from ...data.images import rgb8_to_unit


@dataclass(frozen=True)
class ResizeCrop:
    """ocbank's geometry on anomalib batches: image by image with PIL, the pixels ``ocbank predict`` sees.

    Called as anomalib's pre-processor transform: ``(image [B, 3, H, W] float in [0, 1],
    gt_mask [B, H, W] or None) -> (image [B, 3, S, S], gt_mask [B, S, S])``, or with the
    image alone. Images are taken back to 8 bits (anomalib decodes 8-bit files to
    ``k / 255``, so this is exact), resized and cropped by :class:`ocbank.data.Transform`
    (bilinear), and scaled to [0, 1]; masks go through the same transform (nearest).
    """

    resize: int
    crop: int | None

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        geometry = Transform(self.resize, self.crop)
        u8 = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        rgb = np.stack([geometry.rgb(Image.fromarray(im)) for im in u8])
        out = rgb8_to_unit(rgb).contiguous().to(images.device)
        return _like(out, images)

    def _masks(self, masks: torch.Tensor) -> torch.Tensor:
        geometry = Transform(self.resize, self.crop)
        arr = masks.detach().cpu().numpy()
        flat = arr.reshape(-1, *arr.shape[-2:])
        out = np.stack([geometry.mask(m > 0, (m.shape[1], m.shape[0]), "gt_mask") for m in flat])
        out = torch.from_numpy(out.reshape(*arr.shape[:-2], *out.shape[-2:])).to(masks.device, masks.dtype)
        return _like(out, masks)

    def __call__(self, image: torch.Tensor, *gt_mask: torch.Tensor | None) -> Any:
        """``(image)`` -> image; ``(image, gt_mask)`` -> (image, gt_mask), as anomalib's pre-processor calls it."""
        single = image.ndim == 3
        out = self._images(image[None] if single else image)
        out = out[0] if single else out
        if not gt_mask:
            return out
        mask = gt_mask[0]
        return out, (None if mask is None else self._masks(mask))


def _like(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Keep torchvision's tensor subclass (tv_tensors.Image / Mask) of ``ref``."""
    from torchvision import tv_tensors  # noqa: PLC0415

    return tv_tensors.wrap(out, like=ref) if isinstance(ref, tv_tensors.TVTensor) else out


def resize_weights(n: int | torch.SymInt, size: int, like: torch.Tensor) -> torch.Tensor:
    """[n, size] weights of PIL's bilinear resize of a line of n pixels to ``size`` (output j = sum_i x_i w_ij).

    PIL's triangle filter, stretched by the scale when shrinking (its antialiasing), each
    column normalised to sum 1; built from ``arange`` so that n may be a symbolic size.
    """
    i = torch.arange(n, device=like.device, dtype=like.dtype)
    scale = torch.ones((), device=like.device, dtype=like.dtype) * n / size
    support = torch.clamp(scale, min=1.0)
    center = (torch.arange(size, device=like.device, dtype=like.dtype) + 0.5) * scale
    w = torch.clamp(1.0 - torch.abs((i[:, None] + 0.5 - center[None, :]) / support), min=0.0)
    return w / w.sum(0, keepdim=True)


def _to_level(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp(0, 255)  # PIL rounds half up, to 8 bits


class ExportResizeCrop(nn.Module):
    """The traceable form of :class:`ResizeCrop` for exported graphs: [B, 3, H, W] in [0, 1] -> [B, 3, S, S].

    PIL's resize written as two matrix products (:func:`resize_weights`; rows first, 8-bit
    rounding after each pass, as PIL does), then the same crop. It exports with dynamic
    H and W as MatMul nodes that onnxruntime and OpenVINO compute alike (OpenVINO's own
    antialiased Resize does not match PIL), and stays within one 8-bit level of PIL on
    every pixel (equal on most: the rest are PIL's fixed-point ties).
    """

    def __init__(self, resize: int, crop: int | None) -> None:
        super().__init__()
        self.resize = resize
        self.crop = crop or resize

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = _to_level(image.clamp(0, 1) * 255)
        x = _to_level(torch.matmul(x, resize_weights(x.shape[-1], self.resize, x)))
        x = _to_level(torch.matmul(resize_weights(x.shape[-2], self.resize, x).T, x))
        off = (self.resize - self.crop) // 2
        return x[..., off : off + self.crop, off : off + self.crop] / 255.0


class OCBankPreProcessor(PreProcessor):
    """anomalib's PreProcessor with ocbank's resize and crop (no Normalize: the model normalises).

    Training, validation, test and predict batches go through :class:`ResizeCrop` (PIL,
    as ocbank); the exported graph through :class:`ExportResizeCrop`. The geometry comes
    from the model's own settings, so checkpoints store none of it.
    """

    def __init__(self, resize: int, crop: int | None) -> None:
        super().__init__(transform=None)
        self.transform = ResizeCrop(resize, crop)
        self.export_transform = ExportResizeCrop(resize, crop)

    def checkpoint_config(self) -> dict[str, Any]:
        return {"transform": None}  # rebuilt from OCBank's hyper-parameters

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        del config  # the geometry is the model's, not the checkpoint's
