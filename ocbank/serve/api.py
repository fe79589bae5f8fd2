"""The HTTP contract without HTTP: error codes, request decoding and response bodies.

Every refusal is an :class:`ApiError` carrying its status and a stable ``code``; the
ingress turns it into ``{"error": {"code", "message"}}``. Bad input never reaches a
model replica: it is decoded here, with the reader ``predict`` uses
(:func:`ocbank.data.images.open_image`: every mode, EXIF, the pixel limit).
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterable
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import Transform, open_image
from ..errors import DataError, ImageTooLargeError, InputTypeError, NotAnImageError, OcbankError

TIMEOUT_HEADER = "x-timeout-ms"
# nginx's status for a request whose client hung up before its answer: counted apart from 5xx.
CLIENT_CLOSED = 499
LABELS = {0: "OK", 1: "NG"}
UNCALIBRATED = "this bank has no calibrated thresholds: label and mask are null. Rebuild or update it with calibration."


class ApiError(OcbankError):
    """A request the service refuses: HTTP ``status``, a stable ``code`` and a one-line message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def check_length(declared: str | None, max_bytes: int) -> None:
    """Refuse a Content-Length over ``max_bytes`` (413) before the body is read."""
    if declared is None:
        return
    try:
        n = int(declared)
    except ValueError:
        raise ApiError(400, "bad_request", f"Content-Length must be an integer, got {declared!r}.") from None
    if n > max_bytes:
        raise too_large(n, max_bytes)


def too_large(size: int, max_bytes: int, so_far: bool = False) -> ApiError:
    """413 for a body of ``size`` bytes (``so_far``: of at least that many, still arriving)."""
    msg = f"the body is {size}{' or more' if so_far else ''} bytes, over the limit of {max_bytes}. Send a smaller image."
    return ApiError(413, "too_large", msg)


def body_timeout(timeout_s: float) -> ApiError:
    msg = (f"the request body did not arrive within {timeout_s * 1000:.0f} ms (X-Timeout-Ms). "
           "Send the whole body at once, or allow more time.")
    # The body was not read to its end, so the connection cannot carry another request.
    return ApiError(408, "timeout", msg, {"Connection": "close"})


async def read_body(chunks: AsyncIterable[bytes], max_bytes: int, timeout_s: float) -> bytes:
    """The request body from its ``chunks`` (Starlette's ``request.stream()``), bounded in size and time.

    The limit is checked as each chunk arrives, whether the length was declared or the
    body is chunked: 413 as soon as more than ``max_bytes`` came, so no more than that is
    ever held. A body that has not arrived within ``timeout_s`` (what is left of the
    request's deadline) is a 408; an upload that stalls frees its slot at the deadline.
    """
    parts: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise too_large(size, max_bytes, so_far=True)
            parts.append(chunk)

    if timeout_s <= 0:
        raise body_timeout(0.0)
    try:
        await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        parts.clear()
        raise body_timeout(timeout_s) from None
    except BaseException:
        parts.clear()  # the refusal's traceback holds this frame: free the bytes now, not at a garbage collection
        raise
    return b"".join(parts)


def decode_image(body: bytes, transform: Transform, max_bytes: int) -> np.ndarray:
    """Encoded image bytes -> the model's input, uint8 RGB [S, S, 3] (resized and cropped as ``predict`` does).

    400: empty or undecodable; 413: over ``max_bytes`` or the pixel limit; 415: not an image.
    """
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty. POST the encoded image (PNG, JPEG, BMP, TIFF).")
    if len(body) > max_bytes:
        raise too_large(len(body), max_bytes)
    where = "the request body"
    try:
        image = open_image(body, where=where)
        rgb = transform.rgb(image)
    except NotAnImageError as exc:
        raise ApiError(415, "not_an_image", str(exc)) from None
    except ImageTooLargeError as exc:
        raise ApiError(413, "too_large", str(exc)) from None
    except (DataError, InputTypeError, OSError) as exc:
        raise ApiError(400, "undecodable", " ".join(str(exc).split()) or type(exc).__name__) from None
    return rgb


def request_timeout(header: str | None, default_s: float) -> float:
    """Seconds this request may take: the X-Timeout-Ms header, or the server's default."""
    if header is None:
        return default_s
    try:
        ms = float(header)
    except ValueError:
        ms = float("nan")
    if not (ms > 0 and np.isfinite(ms)):
        raise ApiError(400, "bad_request", f"X-Timeout-Ms must be a positive number of milliseconds, got {header!r}.")
    return ms / 1000.0


def query_flags(mask: str | None, map_: str | None) -> tuple[bool, bool]:
    """``?mask=png`` and ``?map=1`` -> (want_mask, want_map); anything else is a 400 naming it."""
    if mask not in (None, "", "png"):
        raise ApiError(400, "bad_request", f"mask must be 'png', got {mask!r}.")
    if map_ not in (None, "", "0", "1", "true", "false"):
        raise ApiError(400, "bad_request", f"map must be 0 or 1, got {map_!r}.")
    return mask == "png", map_ in ("1", "true")


def mask_png(mask: np.ndarray) -> str:
    """Binary mask [S, S] -> base64 of an 8-bit PNG (255 = defect pixel)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def grid_map(amap: np.ndarray, cell: int) -> list[list[float]]:
    """Anomaly map [S, S] -> its mean over each ``cell`` x ``cell`` patch: [S / cell, S / cell], the feature grid."""
    s = amap.shape[0] // cell
    cells = np.asarray(amap[: s * cell, : s * cell], dtype=np.float64).reshape(s, cell, s, cell)
    return np.round(cells.mean(axis=(1, 3)), 6).tolist()
