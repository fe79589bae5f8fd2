"""The Open Inference Protocol (v2, REST), as KServe and Triton speak it, on ocbank's banks.

A bank is a model named by its product; its one version is the bank file's sha256. The
model takes one input, ``image``: ``BYTES`` of shape ``[N]``, each element one encoded
image file (PNG, JPEG, ...), sent in the binary tensor data extension (each element a
little-endian uint32 length, then its bytes, after the JSON header whose length the
``Inference-Header-Content-Length`` header gives) or in JSON as the file's base64. It
answers ``score``, and for a calibrated bank ``normalized``, ``threshold`` and ``label``,
each of shape ``[N]``, plus ``mask`` (``BOOL [N, S, S]``) when asked for. Outputs are
JSON, or binary where the request asks for it (``binary_data`` per output, or
``binary_data_output`` for all). Errors are ``{"error": "<message>"}``.

The translation is pure (no Ray, no HTTP framework): the ingress parses with
:func:`parse_infer`, scores each image as ``/v1/inspect`` does, and answers with
:func:`infer_response`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .api import UNCALIBRATED, ApiError
from .banks import BankInfo

PREFIX = "/v2"
HEADER_LENGTH = "inference-header-content-length"  # the binary tensor data extension's header
INPUT = "image"
EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "ocbank"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
HINT = (f"Send input {INPUT!r} as BYTES of shape [N], each element one encoded image file: binary "
        "(tritonclient's default) or, in JSON, the file's base64.")
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Output:
    """One output tensor: its datatype and shape (``S`` stands for the bank's image size)."""

    name: str
    datatype: str
    shape: tuple[str | int, ...]
    calibrated_only: bool = True
    default: bool = True  # sent when the request names no outputs


OUTPUTS = (
    Output("score", "FP64", ("N",), calibrated_only=False),
    Output("normalized", "FP64", ("N",)),
    Output("threshold", "FP64", ("N",)),
    Output("label", "BYTES", ("N",)),
    Output("mask", "BOOL", ("N", "S", "S"), default=False),
)


def is_v2(path: str) -> bool:
    """Whether a request path is one of the protocol's (its errors take the protocol's shape)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def element(i: int) -> str:
    """How messages name the ``i``-th image of a request."""
    return f"element {i} of input {INPUT!r}"


def error_body(message: str) -> dict[str, str]:
    return {"error": message}


def outputs_for(info: BankInfo) -> list[Output]:
    """The outputs a bank has: an uncalibrated bank has no threshold, so only ``score``."""
    return [o for o in OUTPUTS if info.decision is not None or not o.calibrated_only]


def _shape(output: Output, n: int | None, size: int) -> list[int]:
    return [(-1 if n is None else n) if d == "N" else size if d == "S" else int(d) for d in output.shape]


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": PLATFORM, "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(info: BankInfo) -> dict[str, Any]:
    """The model metadata response: name, versions (the bank's sha256), platform, inputs, outputs."""
    meta: dict[str, Any] = {
        "name": info.product,
        "versions": [info.sha256],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": o.name, "datatype": o.datatype, "shape": _shape(o, None, info.image_size)}
                    for o in outputs_for(info)],
    }
    if info.decision is None:
        meta["parameters"] = {"note": UNCALIBRATED}
    return meta


def check_version(info: BankInfo, version: str | None) -> None:
    """A version in the path must be the served bank's sha256 (404 otherwise)."""
    if version is not None and version != info.sha256:
        msg = f"model {info.product!r} has no version {version!r}; the bank served is version {info.sha256}."
        raise ApiError(404, "unknown_version", msg)


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: its id, the encoded images, and the outputs asked for (name, binary)."""

    id: str | None
    images: list[bytes]
    outputs: list[tuple[str, bool]]

    def wants(self, name: str) -> bool:
        return any(n == name for n, _ in self.outputs)


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def _refuse_constant(name: str) -> None:
    raise _bad(f"the inference request's JSON holds {name}, which is not JSON. Send finite numbers.")


def _header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """Split the body into its JSON header (parsed) and the binary data after it."""
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 < n <= len(body):
            msg = f"Inference-Header-Content-Length must be the JSON header's length, 1 to {len(body)}, got {header_length!r}."
            raise _bad(msg)
        head, rest = body[:n], body[n:]
    try:
        request = json.loads(head, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # a NaN or infinity raises ApiError, through
        msg = f"the inference request is not JSON ({exc}). Send the protocol's JSON header, then any binary data."
        raise _bad(msg) from None
    if not isinstance(request, dict):
        raise _bad(f"the inference request must be a JSON object, got {type(request).__name__}.")
    return request, rest


def _count(shape: Any, max_images: int) -> int:
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and not isinstance(shape[0], bool)):
        raise _bad(f"input {INPUT!r} must have shape [N], one element per image, got {shape!r}.")
    n = shape[0]
    if not 1 <= n <= max_images:
        raise _bad(f"input {INPUT!r} holds {n} images; send 1 to {max_images} per request (--max-batch).")
    return n


def _binary_elements(data: bytes, n: int) -> list[bytes]:
    """The binary form of a BYTES tensor: each element a little-endian uint32 length, then its bytes."""
    out, at = [], 0
    for i in range(n):
        if at + _LENGTH.size > len(data):
            raise _bad(f"the binary data of input {INPUT!r} ends before element {i} of {n}. {HINT}")
        (size,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + size > len(data):
            raise _bad(f"{element(i)} declares {size} bytes, but only {len(data) - at} follow. {HINT}")
        out.append(data[at : at + size])
        at += size
    if at != len(data):
        raise _bad(f"the binary data of input {INPUT!r} has {len(data) - at} bytes after its {n} elements. {HINT}")
    return out


def _json_elements(data: Any, n: int) -> list[bytes]:
    flat = data[0] if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list) else data
    if not (isinstance(flat, list) and len(flat) == n and all(isinstance(x, str) for x in flat)):
        raise _bad(f"the JSON data of input {INPUT!r} must be {n} base64 string(s), one per image. {HINT}")
    out = []
    for i, text in enumerate(flat):
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise _bad(f"{element(i)} is not base64. {HINT}") from None
    return out


def _requested(request: dict[str, Any], available: list[Output], binary_all: bool) -> list[tuple[str, bool]]:
    names = [o.name for o in available]
    asked = request.get("outputs")
    if asked is None:
        return [(o.name, binary_all) for o in available if o.default]
    if not isinstance(asked, list) or not asked:
        raise _bad(f"'outputs' must be a non-empty list of {{'name': ...}}, got {asked!r}. Outputs: {names}.")
    out = []
    for item in asked:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            extra = f" {UNCALIBRATED}" if any(o.name == name for o in OUTPUTS) else ""
            raise _bad(f"this model has no output {name!r}; its outputs are {names}.{extra}")
        params = item.get("parameters") or {}
        binary = params.get("binary_data", binary_all) if isinstance(params, dict) else binary_all
        if not isinstance(binary, bool):
            raise _bad(f"output {name!r}'s binary_data must be true or false, got {binary!r}.")
        if any(n == name for n, _ in out):
            raise _bad(f"output {name!r} is asked for twice.")
        out.append((name, binary))
    return out


def parse_infer(body: bytes, header_length: str | None, info: BankInfo, max_images: int) -> InferRequest:
    """An inference request's bytes -> its id, images and requested outputs; 400 ``bad_request`` naming the problem."""
    request, binary = _header(body, header_length)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad(f"the request 'id' must be a string, got {request_id!r}.")
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"the request 'parameters' must be an object, got {params!r}.")
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise _bad(f"binary_data_output must be true or false, got {binary_all!r}.")
    inputs = request.get("inputs")
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict)):
        raise _bad(f"the request must have exactly one input, {INPUT!r}. {HINT}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT or tensor.get("datatype") != "BYTES":
        got = (tensor.get("name"), tensor.get("datatype"))
        raise _bad(f"the input must be named {INPUT!r} with datatype BYTES, got name and datatype {got}. {HINT}")
    n = _count(tensor.get("shape"), max_images)
    tensor_params = tensor.get("parameters") or {}
    size = tensor_params.get("binary_data_size") if isinstance(tensor_params, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise _bad(f"input {INPUT!r} declares binary_data_size {size!r}, but {len(binary)} bytes follow the JSON header.")
        images = _binary_elements(binary, n)
    else:
        if binary:
            raise _bad(f"{len(binary)} bytes follow the JSON header, but input {INPUT!r} declares no binary_data_size.")
        images = _json_elements(tensor.get("data"), n)
    return InferRequest(request_id, images, _requested(request, outputs_for(info), binary_all))


def _mask_array(encoded: str, size: int) -> np.ndarray:
    """The replica's base64 PNG mask -> bool [S, S] (PNG is lossless: the same pixels)."""
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as img:
        mask = np.asarray(img) > 0
    if mask.shape != (size, size):
        msg = f"a replica's mask is {mask.shape}, not the bank's ({size}, {size})."
        raise RuntimeError(msg)
    return mask


def _tensor(name: str, rows: list[dict[str, Any]], size: int) -> np.ndarray:
    if name == "label":
        return np.array([r["label"].encode() for r in rows], dtype=object)
    if name == "mask":
        return np.stack([_mask_array(r["mask"], size) for r in rows])
    return np.array([r[name] for r in rows], dtype=np.float64)


def _binary(values: np.ndarray) -> bytes:
    if values.dtype == object:  # BYTES: each element's length, then the element
        return b"".join(_LENGTH.pack(len(v)) + v for v in values.ravel())
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()


def _json_data(values: np.ndarray) -> list[Any]:
    if values.dtype == object:
        return [v.decode() for v in values.ravel()]
    return values.ravel().tolist()


def infer_response(info: BankInfo, request: InferRequest, rows: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
    """The inference response for one result row per image (what the replica answers ``/v1/inspect`` with).

    Returns the body and its headers: JSON alone, or the JSON header followed by the
    binary outputs with ``Inference-Header-Content-Length`` giving the header's length.
    """
    types = {o.name: o for o in OUTPUTS}
    outputs, chunks = [], []
    for name, binary in request.outputs:
        values = _tensor(name, rows, info.image_size)
        tensor: dict[str, Any] = {"name": name, "datatype": types[name].datatype, "shape": list(values.shape)}
        if binary:
            chunk = _binary(values)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = _json_data(values)
        outputs.append(tensor)
    response: dict[str, Any] = {"model_name": info.product, "model_version": info.sha256, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    if info.decision is None:
        response["parameters"] = {"note": UNCALIBRATED}
    head = json.dumps(response, allow_nan=False, separators=(",", ":")).encode()
    if not chunks:
        return head, {"content-type": JSON_TYPE}
    return head + b"".join(chunks), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(head))}
