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
import re
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
HOW_TO_SEND = ("The image goes as the request body (curl --data-binary @part.png URL) "
               "or as the one file of a multipart form (curl -F file=@part.png URL).")
# The codes of the errors Starlette raises itself (no route, wrong method); any other status is http_error.
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
HTTP_ERROR = "http_error"
# A form carries one image; more parts than this are refused before they are looked at.
MAX_FORM_PARTS = 8
_PLAIN_ENCODINGS = ("", "binary", "8bit", "7bit")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class ApiError(OcbankError):
    """A request the service refuses: HTTP ``status``, a stable ``code`` and a one-line message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self._headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)

    def headers(self) -> dict[str, str]:
        """Headers the refusal carries: a 401 names the scheme that opens the endpoint (RFC 9110);
        others those it was raised with (a 408 for a body still arriving closes the connection)."""
        return {**({"WWW-Authenticate": "Bearer"} if self.status == 401 else {}), **self._headers}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def plain_error(exc: BaseException, limit: int = 500) -> str:
    """One line for an error that reached the ingress from a replica: ocbank's own message.

    Ray wraps an exception raised in a replica (``RayTaskError``, ``RayActorError``) with
    the remote traceback and ANSI colour codes; its ``cause`` is the exception that was
    raised. Any other error is named by its type, its message cut at ``limit`` characters.
    """
    seen: set[int] = set()
    while isinstance(getattr(exc, "cause", None), BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.cause  # type: ignore[attr-defined]
    text = " ".join(_ANSI.sub("", str(exc)).split())
    if not isinstance(exc, OcbankError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def form_file(body: bytes, content_type: str) -> bytes:
    """The bytes of the one part of a ``multipart/form-data`` body (``curl -F file=@part.png``).

    400 ``bad_form``: no boundary, a truncated or malformed form, a transfer encoding
    other than binary, or not exactly one part.
    """
    from python_multipart.exceptions import FormParserError  # noqa: PLC0415 - the serve extra's form parser
    from python_multipart.multipart import MultipartParser, parse_options_header  # noqa: PLC0415

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_form", f"a multipart/form-data body needs a boundary in its Content-Type, got {content_type!r}.")
    parts: list[dict[str, Any]] = []
    header: list[bytes] = [b"", b""]  # the field and value of the header being read
    ended: list[bool] = []

    def part_begin() -> None:
        if len(parts) >= MAX_FORM_PARTS:
            raise ApiError(400, "bad_form", f"the form has more than {MAX_FORM_PARTS} parts. Send one image per request.")
        parts.append({"headers": {}, "data": []})

    def header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def header_end() -> None:
        parts[-1]["headers"][header[0].decode("latin-1").strip().lower()] = header[1].decode("latin-1").strip()
        header[0], header[1] = b"", b""

    def part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    callbacks = {"on_part_begin": part_begin, "on_header_field": header_field, "on_header_value": header_value,
                 "on_header_end": header_end, "on_part_data": part_data, "on_end": lambda: ended.append(True)}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise ApiError(400, "bad_form", f"the multipart form could not be read: {exc}. {HOW_TO_SEND}") from None
    if not ended:
        raise ApiError(400, "bad_form", f"the multipart form ends before its closing boundary (truncated?). {HOW_TO_SEND}")
    if len(parts) != 1:
        names = [_form_name(p["headers"]) for p in parts]
        raise ApiError(400, "bad_form", f"the form must hold exactly one file, got {len(parts)} part(s) {names}. {HOW_TO_SEND}")
    encoding = parts[0]["headers"].get("content-transfer-encoding", "").lower()
    if encoding not in _PLAIN_ENCODINGS:
        raise ApiError(400, "bad_form", f"the form's file has Content-Transfer-Encoding {encoding!r}; send its bytes as they are (binary).")
    return b"".join(parts[0]["data"])


def _form_name(headers: dict[str, str]) -> str:
    from python_multipart.multipart import parse_options_header  # noqa: PLC0415

    _, params = parse_options_header(headers.get("content-disposition", ""))
    return params.get(b"name", b"").decode("latin-1")


def is_form(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == "multipart/form-data"


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


def decode_image(body: bytes, transform: Transform, max_bytes: int, content_type: str | None = None, *,
                 where: str = "the request body", hint: str = HOW_TO_SEND) -> np.ndarray:
    """Encoded image bytes -> the model's input, uint8 RGB [S, S, 3] (resized and cropped as ``predict`` does).

    The image is the body itself, or, when ``content_type`` is ``multipart/form-data``, the
    form's one file (:func:`form_file`); the whole body is bounded by ``max_bytes`` either way.
    ``where`` names the image in messages; ``hint`` says how to send one.
    400: empty, undecodable or a bad form; 413: over ``max_bytes`` or the pixel limit; 415: not an image.
    """
    if len(body) > max_bytes:
        msg = f"{where} is {len(body)} bytes, over the limit of {max_bytes}. Send a smaller image."
        raise ApiError(413, "too_large", msg)
    if body and is_form(content_type):
        body = form_file(body, content_type or "")
    if not body:
        raise ApiError(400, "empty_body", f"{where} holds no image. {hint}")
    try:
        image = open_image(body, where=where)
        rgb = transform.rgb(image)
    except NotAnImageError as exc:
        raise ApiError(415, "not_an_image", f"{exc} {hint}") from None
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
