"""Request bodies to images, and predictions to response bodies.

Input: raw image bytes (image/jpeg, image/png, image/webp, image/bmp, application/x-image,
application/octet-stream), JSON ({"image": b64}, {"url": ...}, {"instances": [{"b64": ...} |
{"url": ...} | b64, ...]}) or NPY (HxWxC uint8, or NxHxWxC). Output: JSON with the top-k per
image, or the NPY probability matrix.

Parsing returns "sources" (bytes or arrays), not decoded images: decoding happens one image at
a time just before preprocessing, so a request of 50 photos never holds 50 full-size images.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Callable
from http import HTTPStatus

import numpy as np

from .errors import RequestError, bad_request, too_large
from .settings import Settings

JSON = "application/json"
NPY = "application/x-npy"
IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp",
                         "application/x-image", "application/octet-stream"})
ACCEPT_TYPES = (JSON, NPY)
_DATA_URI = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)

Source = bytes | np.ndarray


def media_type(header: str | None) -> str:
    """'Image/JPEG; q=1' -> 'image/jpeg'."""
    return (header or "").split(";", 1)[0].strip().lower()


def parse_body(body: bytes | bytearray | None, content_type: str | None, settings: Settings,
               fetch: Callable[[str], bytes] | None = None) -> list[Source]:
    ctype = media_type(content_type)
    if not ctype:
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           "The request has no Content-Type: send image/jpeg, image/png, image/webp, "
                           "application/x-image, application/json or application/x-npy.")
    if ctype not in IMAGE_TYPES and ctype not in (JSON, NPY):
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {ctype!r} is not supported: send image/jpeg, image/png, image/webp, "
                           "application/x-image, application/json or application/x-npy.")
    body = bytes(body or b"")
    if len(body) > settings.max_body_bytes:
        raise too_large(f"The request body is {len(body)} bytes, over the limit of {settings.max_body_bytes} "
                        "(SAGEMAKER_MAX_PAYLOAD_IN_MB): send fewer or smaller images per request.")
    if not body:
        raise bad_request("The request body is empty: send an image.")
    if ctype in IMAGE_TYPES:
        return [body]
    if ctype == NPY:
        return _parse_npy(body)
    return _parse_json(body, fetch)


def _parse_npy(body: bytes) -> list[Source]:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError... for a bad file
        raise bad_request(f"The body is not a valid .npy array ({type(exc).__name__}: {exc}); "
                          "write it with numpy.save.") from None
    if not isinstance(array, np.ndarray):
        raise bad_request("The body holds several arrays (.npz); send one array written with numpy.save.")
    if array.ndim == 4:
        if array.shape[0] == 0:
            raise bad_request("The batch has no images (shape starts with 0).")
        return list(array)
    return [array]


def _parse_json(body: bytes, fetch: Callable[[str], bytes] | None) -> list[Source]:
    try:
        # From bytes, json detects UTF-8 with or without a BOM (which Windows tools write), UTF-16
        # and UTF-32, as RFC 8259 lets a reader accept.
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"The body is not valid JSON ({exc}).") from None
    except RecursionError:  # the decoder recurses per level: a few KB of '[' would be a 500
        raise bad_request('The JSON body is nested too deeply to read: send {"image": "<base64>"} or '
                          '{"instances": [{"b64": "<base64>"}, ...]}.') from None
    if not isinstance(doc, dict):
        raise bad_request('The JSON body must be an object: {"image": "<base64>"} or '
                          '{"instances": [{"b64": "<base64>"}, ...]}.')
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list) or not instances:
            raise bad_request('"instances" must be a non-empty list of {"b64": "<base64>"} objects.')
        return [_instance(item, f"instances[{i}]", fetch) for i, item in enumerate(instances)]
    if "image" in doc or "b64" in doc or "url" in doc:
        return [_instance(doc, "the request", fetch)]
    raise bad_request(f'The JSON body has no image: found keys {sorted(doc)[:10]}, expected "image", "url" '
                      'or "instances".')


def _instance(item, where: str, fetch: Callable[[str], bytes] | None) -> bytes:
    if isinstance(item, str):
        return _b64(item, where)
    if not isinstance(item, dict):
        raise bad_request(f'{where} must be an object like {{"b64": "<base64>"}} or a base64 string.')
    for key in ("b64", "image"):
        if key in item:
            return _b64(item[key], f"{where}.{key}")
    if "url" in item:
        if fetch is None:
            raise bad_request("URLs cannot be fetched here.")
        return fetch(item["url"])
    raise bad_request(f'{where} has no image: expected a "b64" (or "image") or "url" key, found {sorted(item)[:10]}.')


def _b64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise bad_request(f"{where} must be a base64 string, got {type(value).__name__}.")
    text = _DATA_URI.sub("", value.strip(), count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # URL-safe alphabet (-, _) is common from web clients
            data = base64.b64decode(text, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad_request(f"{where} is not valid base64 ({exc}).") from None
    if not data:
        raise bad_request(f"{where} is empty.")
    return data


def choose_accept(header: str | None, default: str = JSON) -> str:
    """The response type: the first acceptable of the types we produce, in the client's order."""
    if not header or not header.strip():
        return default
    offered = []
    for part in header.split(","):
        mtype = media_type(part)
        q = 1.0
        for param in part.split(";")[1:]:
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        if q > 0:
            offered.append((-q, len(offered), mtype))
    for _, _, mtype in sorted(offered):
        if mtype in ("*/*", "application/*", ""):
            return default
        if mtype in ACCEPT_TYPES:
            return mtype
    raise RequestError(HTTPStatus.NOT_ACCEPTABLE, f"Accept {header[:200]!r} asks for a type this endpoint does not "
                                                  "produce: use application/json or application/x-npy.")


def parse_custom_attributes(header: str | None) -> dict[str, str]:
    """'top_k=3,trace=abc' (or ';' separated) -> {'top_k': '3', 'trace': 'abc'}."""
    attrs = {}
    for part in re.split(r"[,;]", header or ""):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            attrs[key.strip().lower()] = value.strip()
    return attrs


def top_k_from(attrs: dict[str, str], default: int, num_classes: int) -> int:
    raw = attrs.get("top_k", attrs.get("top-k"))
    if raw is None:
        return min(default, num_classes)
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        raise bad_request(f"top_k={raw!r} in X-Amzn-SageMaker-Custom-Attributes must be a whole number >= 1.")
    return min(k, num_classes)


def encode(probs: np.ndarray, class_names: list[str], top_k: int, accept: str) -> tuple[bytes, str]:
    if accept == NPY:
        buf = io.BytesIO()
        np.save(buf, probs.astype(np.float32, copy=False), allow_pickle=False)
        return buf.getvalue(), NPY
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    predictions = []
    for row, idx in zip(probs, order, strict=True):
        top = [{"label": class_names[i], "index": int(i), "probability": round(float(row[i]), 6)} for i in idx]
        predictions.append({"label": top[0]["label"], "index": top[0]["index"],
                            "probability": top[0]["probability"], "top_k": top})
    # One line: batch transform joins records with newlines.
    return json.dumps({"predictions": predictions}, separators=(",", ":")).encode(), JSON
