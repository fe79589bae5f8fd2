"""Reading images and masks, and the resize/crop/normalise transform.

Every image becomes 8-bit RGB scaled by its mode's *range*, never by ``convert("RGB")``
alone (which clips 16-bit and float pixels):

====================  ==========================================================
PIL mode / array      to 8 bits
====================  ==========================================================
``1``, bool           0 / 255
``L``, ``P``, ``RGB`` as stored (palette looked up; alpha dropped)
``LA``, ``RGBA``      colour channels, alpha dropped (not composited)
``I;16*``, uint16     value / 257, rounded (65535 -> 255)
``I`` (32-bit int)    taken as 16-bit: value / 257; values outside 0..65535 refuse the file
``F``, float arrays   value x 255, rounded. Documented range [0, 1]: values within half a
                      level of it are clipped into it; anything further outside, or NaN/inf,
                      refuses the file (its scale is unknown, so any guess would be silent).
                      16-bit float TIFFs, which PIL cannot open, are read the same way with
                      tifffile when it is installed (``pip install ocbank[tiff]``)
``CMYK``, ``YCbCr``,  PIL's colour conversion to RGB
``LAB``, ``HSV``
====================  ==========================================================

EXIF orientation is applied (``ImageOps.exif_transpose``). A file whose header declares
more than :data:`MAX_IMAGE_PIXELS` pixels is refused before decoding, and a truncated or
corrupt file is refused rather than half-decoded: both raise :class:`DataError` naming
the file, which the loader turns into a one-line warning and a skipped, counted image.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import DataError, ImageTooLargeError, InputTypeError, NotAnImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Largest image (width x height) ocbank decodes: 64 megapixels, about 200 MB as RGB.
# Below PIL's own DecompressionBombWarning threshold (89.5 MP), so every file we accept
# decodes without that warning, and every larger one is refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192

_FLOAT_SLACK = 0.5 / 255  # half an 8-bit level: rounding noise, clipped silently
_DIRECT_MODES = {"L", "RGB"}
_EXIF_ORIENTATION = 0x0112
_COLOUR_MODES = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBA", "RGBa"}


# ---------------------------------------------------------------------- arrays
def check_unit_range(lo: float, hi: float, where: str) -> None:
    """The one rule for float pixels, from files, arrays and tensors alike: finite and in [0, 1].

    ``lo`` / ``hi`` are the image's smallest and largest value (NaN when it holds one).
    Values within half an 8-bit level outside [0, 1] are rounding noise and pass.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        msg = f"{where} has NaN or infinite pixel values. Use finite values in [0, 1]."
        raise DataError(msg)
    if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
        hint = " It looks like 0..255: divide by 255." if hi > 2.0 else ""
        msg = (
            f"{where} is a float image with values in [{lo:.4g}, {hi:.4g}], outside [0, 1].{hint} "
            "Scale it to [0, 1] or use 8- or 16-bit integers."
        )
        raise DataError(msg)


def _float_to_u8(values: np.ndarray, where: str) -> np.ndarray:
    """Float array in [0, 1] -> uint8 (x 255, rounded); refuse NaN/inf or values outside."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    check_unit_range(lo, hi, where)
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _int_to_u8(values: np.ndarray, where: str) -> np.ndarray:
    """16-bit range integers -> uint8 (/257, rounded); refuse values outside 0..65535."""
    values = np.asarray(values, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        msg = (
            f"{where} has integer pixel values in [{values.min()}, {values.max()}], outside the 16-bit range "
            "0..65535. Save it as 8- or 16-bit."
        )
        raise DataError(msg)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)


def _to_gray_or_rgb_u8(arr: np.ndarray, where: str) -> np.ndarray:
    """Scale one array of any supported dtype to uint8, keeping its shape."""
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 4:
        return _int_to_u8(arr, where)
    if arr.dtype.kind == "f":
        return _float_to_u8(arr, where)
    msg = f"{where} has dtype {arr.dtype}. Use uint8, uint16, bool, or float in [0, 1]."
    raise InputTypeError(msg)


def array_to_rgb8(arr: np.ndarray, where: str = "image array") -> np.ndarray:
    """Array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped) -> uint8 RGB [H, W, 3].

    dtypes: uint8 as is, uint16 / 257, bool -> 0/255, float in [0, 1] x 255 (rounded).
    """
    if not isinstance(arr, np.ndarray):
        msg = f"{where} must be a numpy array, got {type(arr).__name__}. Pass a path, PIL image or array."
        raise InputTypeError(msg)
    if arr.dtype not in (np.uint8, np.uint16, np.bool_) and arr.dtype.kind != "f":
        msg = f"{where} has dtype {arr.dtype}. Use uint8, uint16, bool, or float in [0, 1]."
        raise InputTypeError(msg)
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[..., :3] if arr.shape[2] == 4 else arr
    elif arr.ndim != 2:
        msg = f"{where} has shape {arr.shape}. Use [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]."
        raise DataError(msg)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        msg = f"{where} has shape {arr.shape}, an empty image. Pass at least one pixel."
        raise DataError(msg)
    u8 = _to_gray_or_rgb_u8(arr, where)
    if u8.ndim == 2:
        u8 = u8[..., None]
    if u8.shape[2] == 1:
        u8 = np.repeat(u8, 3, axis=2)
    return np.ascontiguousarray(u8)


def pil_to_rgb8(img: Image.Image, where: str = "image") -> np.ndarray:
    """PIL image of any mode -> uint8 RGB [H, W, 3], scaled by the mode's range (see module doc)."""
    mode = img.mode
    if mode in _DIRECT_MODES:
        arr = np.asarray(img)
    elif mode == "1":
        arr = np.asarray(img).astype(np.uint8) * 255
    elif mode == "P":
        # Palette with transparency: through RGBA so PIL keeps the colours, then drop alpha.
        arr = np.asarray(img.convert("RGBA" if "transparency" in img.info else "RGB"))[..., :3]
    elif mode.startswith("I;16") or mode == "I":
        arr = _int_to_u8(np.asarray(img), where)
    elif mode == "F":
        arr = _float_to_u8(np.asarray(img), where)
    elif mode == "LA":
        arr = np.asarray(img)[..., 0]
    elif mode == "PA":
        arr = np.asarray(img.convert("RGBA"))[..., :3]
    elif mode in _COLOUR_MODES:
        arr = np.asarray(img.convert("RGB"))
    else:
        msg = f"{where} has PIL mode {mode!r}, which ocbank cannot scale to 8 bits. Save it as 8- or 16-bit RGB/gray."
        raise DataError(msg)
    return array_to_rgb8(np.asarray(arr), where)


def pil_to_mask(img: Image.Image, where: str = "mask") -> np.ndarray:
    """PIL mask of any mode -> bool [H, W]: any nonzero pixel (any colour channel) is anomalous."""
    mode = img.mode
    if mode == "P":
        arr = np.asarray(img.convert("RGBA" if "transparency" in img.info else "RGB"))[..., :3]
    elif mode == "LA":
        arr = np.asarray(img)[..., 0]
    elif mode in ("PA", "RGBA", "RGBa", "RGBX"):
        arr = np.asarray(img.convert("RGBA"))[..., :3]
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB"))
    else:
        arr = np.asarray(img)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        msg = f"{where} has NaN or infinite values. Save the mask as 0 / nonzero integers."
        raise DataError(msg)
    return arr.any(axis=2) if arr.ndim == 3 else arr != 0


# ---------------------------------------------------------------------- files
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` is, in words: "a regular file", "a FIFO (named pipe)", "a socket", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _not_regular(where: str, mode: int) -> DataError:
    msg = f"{where} is {file_kind(mode)}, not a regular file, and is not read. Pass image files, or remove it."
    return DataError(msg)


def open_regular(path: str | os.PathLike[str], where: str | None = None) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (links followed); anything else is a DataError.

    FIFOs, sockets and devices are refused from ``stat`` without being opened: opening a
    FIFO waits for a writer, and opening a device may act on it. The open itself is
    non-blocking and checked again with ``fstat``, so a file swapped in between the two
    is refused too, and nothing here ever blocks.
    """
    where = os.fspath(path) if where is None else where
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(where, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(where, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _too_large(where: str, size: str) -> ImageTooLargeError:
    msg = (
        f"image {where} declares {size} pixels, more than ocbank's limit of {MAX_IMAGE_PIXELS} "
        "(ocbank.data.images.MAX_IMAGE_PIXELS). Downscale it, or raise the limit if it is genuine."
    )
    return ImageTooLargeError(msg)


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


def _read_tiff(path: BinaryIO, where: str) -> np.ndarray | None:
    """TIFFs PIL cannot open (16-bit float, ...) via tifffile, if installed: array [H, W(, C)]."""
    try:
        import tifffile  # noqa: PLC0415 - optional: pip install ocbank[tiff]
    except ImportError:
        return None
    # A file opened here is named by its descriptor: tifffile is told the name instead.
    with tifffile.TiffFile(path, name=os.path.basename(where) or "image.tif") as tif:
        page = tif.pages[0]
        if page.imagelength * page.imagewidth > MAX_IMAGE_PIXELS:
            raise _too_large(where, f"{page.imagewidth}x{page.imagelength}")
        arr = page.asarray()
        if page.axes.startswith("S"):  # planar: samples first
            arr = np.moveaxis(arr, 0, -1)
    return arr.astype(np.float32) if arr.dtype == np.float16 else arr


def _looks_like_tiff(path: str | os.PathLike[str] | io.BytesIO, where: str) -> bool:
    if isinstance(path, io.BytesIO):
        return path.getvalue()[:4] in _TIFF_MAGIC
    return where.lower().endswith((".tif", ".tiff"))


def _read_file(path: str | os.PathLike[str] | io.BytesIO, where: str | None = None) -> Image.Image | np.ndarray:
    """Decode a file (or encoded bytes) fully, EXIF orientation applied; every failure is a DataError naming it.

    Returns a PIL image, or an array for TIFFs only tifffile can read (16-bit float).
    Bytes no decoder recognises raise :class:`NotAnImageError`; a declared size over
    :data:`MAX_IMAGE_PIXELS` raises :class:`ImageTooLargeError` (both DataErrors).
    """
    where = os.fspath(path) if where is None else where
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched PIL to fill truncated files with grey: we never want that.
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set; ocbank resets it to refuse truncated files")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with contextlib.ExitStack() as stack:
            return _decode(path if isinstance(path, io.BytesIO) else stack.enter_context(open_regular(path, where)),
                           _looks_like_tiff(path, where), where)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own check runs inside Image.open, before ours, for sizes past its limits.
        raise _too_large(where, "a decompression-bomb number of") from exc
    except FileNotFoundError as exc:
        msg = f"image {where} does not exist. Check the path."
        raise DataError(msg) from exc
    except Exception as exc:  # noqa: BLE001 - decoders raise any type on hostile bytes
        detail = " ".join(str(exc).split()) or type(exc).__name__
        msg = f"cannot read image {where}: {detail}. Replace or remove the file."
        raise DataError(msg) from exc


def _decode(source: BinaryIO, tiff: bool, where: str) -> Image.Image | np.ndarray:
    """:func:`_read_file`'s decoding of an open ``source`` (``tiff``: tifffile may read what PIL cannot)."""
    try:
        img = Image.open(source)
    except UnidentifiedImageError as exc:
        if tiff:
            source.seek(0)
            arr = _read_tiff(source, where)
            if arr is not None:
                return arr
        msg = f"{where} is not an image any decoder here recognises. Send PNG, JPEG, BMP, TIFF or WebP."
        raise NotAnImageError(msg) from exc
    with img:
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise _too_large(where, f"{w}x{h}")
        img.load()  # decoded in memory: usable after the file is closed
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (None, 1):
            return img
        upright = ImageOps.exif_transpose(img)
        return img if upright is None else upright


def open_image(source: Any, where: str | None = None) -> Image.Image:
    """Path, encoded bytes, PIL image or array (see :func:`array_to_rgb8`) -> 8-bit RGB PIL image, fully decoded.

    Files and bytes get their EXIF orientation applied; see the module doc for how each mode
    is scaled. ``where`` names bytes in messages (default "image bytes").
    Raises :class:`DataError` (unreadable, too large, out-of-range values) or
    :class:`InputTypeError` (an array dtype or object type that is not an image).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = where or "image bytes"
        if not len(source):
            msg = f"{where} is empty (0 bytes). Send the encoded image file."
            raise DataError(msg)
        decoded = _read_file(io.BytesIO(bytes(source)), where)
        if isinstance(decoded, np.ndarray):
            return Image.fromarray(array_to_rgb8(decoded, where))
        return _rgb_image(decoded, where)
    if isinstance(source, Image.Image):
        return _rgb_image(source, "PIL image")
    if isinstance(source, np.ndarray):
        return Image.fromarray(array_to_rgb8(source))
    if not isinstance(source, (str, os.PathLike)):
        msg = f"an image must be a path, PIL image or numpy array, got {type(source).__name__}."
        raise InputTypeError(msg)
    decoded = _read_file(source)
    if isinstance(decoded, np.ndarray):
        return Image.fromarray(array_to_rgb8(decoded, os.fspath(source)))
    return _rgb_image(decoded, os.fspath(source))


def _rgb_image(img: Image.Image, where: str) -> Image.Image:
    """PIL image -> 8-bit RGB PIL image; PIL's own conversion where it is exact (the common modes)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("L", "1") or (img.mode == "P" and "transparency" not in img.info):
        return img.convert("RGB")  # exact: 1 -> 0/255, L and palette colours copied
    return Image.fromarray(pil_to_rgb8(img, where))


def open_mask(source: Any) -> np.ndarray:
    """Path, PIL image or array -> bool mask [H, W]: any nonzero pixel is anomalous (any bit depth)."""
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 3:
            arr = arr.any(axis=2)
        if arr.ndim != 2:
            msg = f"mask array has shape {source.shape}. Use [H, W] or [H, W, C]."
            raise DataError(msg)
        return np.asarray(arr != 0)
    if isinstance(source, Image.Image):
        return pil_to_mask(source)
    decoded = _read_file(source)
    if isinstance(decoded, np.ndarray):
        return open_mask(decoded)
    return pil_to_mask(decoded, os.fspath(source))


# ---------------------------------------------------------------------- transform
def normalize(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] [..., 3, H, W] -> ImageNet-normalised, same shape, dtype and device.

    The one normalisation: the loader's transform, the Detector's tensor inputs and
    the exported graph (:class:`ocbank.model.module.AnomalyModel`) all call it.
    """
    mean = rgb.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = rgb.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (rgb - mean) / std


def rgb8_to_unit(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB [..., H, W, 3] -> float32 [..., 3, H, W] in [0, 1]: the one uint8 -> [0, 1] step
    (the loader's transform and the served crops both take it)."""
    unit = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)  # a new, writable array (PIL's are read-only)
    return torch.from_numpy(unit).movedim(-1, -3)


@dataclass(frozen=True)
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

    def rgb(self, img: Image.Image | np.ndarray) -> np.ndarray:
        """Image of any mode -> uint8 RGB [S, S, 3], resized and cropped (the geometry alone)."""
        rgb8 = open_image(img) if not (isinstance(img, Image.Image) and img.mode == "RGB") else img
        return np.asarray(self._geometry(rgb8, Image.BILINEAR), dtype=np.uint8)

    def image(self, img: Image.Image | np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Image of any mode -> (normalised tensor [3, S, S], uint8 RGB [S, S, 3] for overlays)."""
        rgb = self.rgb(img)
        return normalize(rgb8_to_unit(rgb)), rgb

    def mask(self, mask: Image.Image | np.ndarray, image_size: tuple[int, int], where: str) -> np.ndarray:
        """Binary mask uint8 [S, S] (any nonzero pixel is 1); resized nearest if its size differs.

        ``image_size`` is the image's (width, height).
        """
        binary = open_mask(mask) if not isinstance(mask, Image.Image) else pil_to_mask(mask, where)
        img = Image.fromarray(binary.astype(np.uint8) * 255)
        if img.size != tuple(image_size):
            log.warning("mask %s is %s but its image is %s: resized (nearest)", where, img.size, tuple(image_size))
            img = img.resize(tuple(image_size), Image.NEAREST)
        return (np.asarray(self._geometry(img, Image.NEAREST)) > 0).astype(np.uint8)
