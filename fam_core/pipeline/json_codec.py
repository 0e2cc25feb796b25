"""JSON form of pipeline requests and responses, for REST front doors (TorchServe, KServe v1).

Requests are flat mappings of fields, gathered from a JSON body, multipart form fields or query
parameters; field values may be ``str``, ``bytes`` (multipart parts, query parameters) or, from
JSON, numbers, booleans and lists. Responses carry the fields of the gRPC ``fam.v1.Result``;
binary fields (heatmap, embedding, overlay) are base64.

Example:
    >>> request = request_from_fields("default-classifier", {"data": b"...", "method": b"cam"})
    >>> request.method, request.images[0].data
    ('cam', b'...')
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from fam_core.pipeline.decode import check_count
from fam_core.pipeline.errors import InvalidArgument, PipelineError
from fam_core.pipeline.limits import Limits
from fam_core.pipeline.request import (
    RESOLUTIONS,
    EncodedImage,
    ExplainRequest,
    ExplainResponse,
    ExplainResult,
    Match,
)

IMAGE_FIELDS: tuple[str, ...] = ("data", "image", "images", "body")
"""Fields holding the images: raw bytes, or base64 text (one string or a list)."""
OPTION_FIELDS: tuple[str, ...] = (
    "method",
    "target_class",
    "resolution",
    "heatmap",
    "embedding",
    "overlay",
    "top_k",
    "references",
    "request_id",
)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def request_from_fields(
    model: str,
    fields: Mapping[str, Any],
    *,
    force_heatmap: bool = False,
    limits: Limits | None = None,
) -> ExplainRequest:
    """The :class:`ExplainRequest` that ``fields`` describe for ``model``.

    Images come from the first of :data:`IMAGE_FIELDS` present; options from
    :data:`OPTION_FIELDS`; any other field is an :class:`InvalidArgument`. ``force_heatmap``
    (explanation routes) always asks for the heatmap. With ``limits`` the number of images
    is checked before any is base64-decoded.
    """
    unknown = sorted(set(fields) - set(IMAGE_FIELDS) - set(OPTION_FIELDS))
    if unknown:
        raise InvalidArgument(
            f"unknown request fields {unknown}; expected images in one of {list(IMAGE_FIELDS)} "
            f"and options among {list(OPTION_FIELDS)}"
        )
    present = [name for name in IMAGE_FIELDS if name in fields]
    if not present:
        raise InvalidArgument(
            f"the request has no image: send it as the body, or in a field named one of "
            f"{list(IMAGE_FIELDS)} (bytes, or base64 text)"
        )
    if len(present) > 1:
        raise InvalidArgument(f"images in several fields {present}; use one")
    if limits is not None:
        check_count(_count(fields[present[0]]) + _count(fields.get("references", ())), limits)
    images = _images(fields[present[0]], present[0])
    target = fields.get("target_class")
    method = _text(fields.get("method", ""), "method")
    return ExplainRequest(
        model=model,
        images=images,
        method=method or None,
        resolution=_resolution(fields.get("resolution", "input")),
        heatmap=True if force_heatmap else _flag(fields.get("heatmap", True), "heatmap"),
        embedding=_flag(fields.get("embedding", False), "embedding"),
        overlay=_flag(fields.get("overlay", False), "overlay"),
        top_k=_integer(fields.get("top_k", 5), "top_k"),
        target_class=None if target in (None, "", b"") else _integer(target, "target_class"),
        references=_images(fields["references"], "references") if "references" in fields else (),
        request_id=_text(fields.get("request_id", ""), "request_id"),
    )


def response_to_json(response: ExplainResponse) -> dict[str, Any]:
    """The JSON form of ``response``: the fields of the gRPC ``ExplainResponse``.

    Example:
        >>> response_to_json(ExplainResponse("m", ()))
        {'model': 'm', 'request_id': '', 'results': []}
    """
    return {
        "model": response.model,
        "request_id": response.request_id,
        "results": [result_to_json(result) for result in response.results],
    }


def result_to_json(result: ExplainResult) -> dict[str, Any]:
    """One image's result; ``heatmap``, ``embedding``, ``overlay_png`` only when present."""
    out: dict[str, Any] = {
        "prediction": _match(result.prediction),
        "scores": list(result.scores),
        "top_k": [_match(match) for match in result.top_k],
        "explained_score": result.explained_score,
    }
    if result.heatmap is not None:
        heatmap = result.heatmap
        out["heatmap"] = {
            "data": _b64(heatmap.data),
            "shape": list(heatmap.shape),
            "dtype": heatmap.dtype,
            "method": heatmap.method,
            "target_layer": heatmap.target_layer,
            "resolution": heatmap.resolution,
        }
        if heatmap.warning:  # all zeros or constant: not an explanation, and why
            out["heatmap"]["warning"] = heatmap.warning
    if result.embedding is not None:
        out["embedding"] = {
            "data": _b64(result.embedding),
            "shape": [result.embedding_dim],
            "dtype": "float32",
        }
    if result.overlay_png is not None:
        out["overlay_png"] = _b64(result.overlay_png)
    return out


def kserve_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a KServe v1 body ``{"instances": [...], "parameters": {...}}``.

    Each instance is one image: base64 text, ``{"b64": text}`` or ``{"data": text}``;
    ``parameters`` holds the options.

    Example:
        >>> kserve_fields({"instances": [{"data": "AA=="}], "parameters": {"method": "cam"}})
        {'method': 'cam', 'data': ['AA==']}
    """
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidArgument('a KServe body needs "instances": a non-empty list of images')
    unknown = sorted(set(body) - {"instances", "parameters"})
    if unknown:
        raise InvalidArgument(
            f'unknown KServe body keys {unknown}; expected "instances", "parameters"'
        )
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidArgument('KServe "parameters" must be an object')
    images = [
        item["data"] if isinstance(item, dict) and set(item) == {"data"} else item
        for item in instances
    ]
    return {**parameters, "data": images}


def error_to_json(error: PipelineError) -> dict[str, Any]:
    """``{"code": ..., "message": ...}`` for a failed request (``code`` as in gRPC)."""
    return {"code": error.code, "message": str(error)}


def _match(match: Match) -> dict[str, Any]:
    return {"label": match.label, "index": match.index, "score": match.score}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list | tuple) else 1


def _images(value: Any, name: str) -> tuple[EncodedImage, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise InvalidArgument(f"field {name!r} is an empty list; expected at least one image")
    return tuple(
        _image(item, f"{name}[{i}]" if len(items) > 1 else name) for i, item in enumerate(items)
    )


def _image(value: Any, name: str) -> EncodedImage:
    if isinstance(value, bytes | bytearray):
        return EncodedImage(bytes(value))
    if isinstance(value, dict) and set(value) == {"b64"}:  # KServe v1 binary convention
        value = value["b64"]
    if isinstance(value, str):
        try:
            return EncodedImage(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidArgument(
                f"field {name!r} is text but not base64; send image bytes or base64 text"
            ) from None
    raise InvalidArgument(
        f"field {name!r} is a {type(value).__name__}; expected image bytes or base64 text"
    )


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidArgument(f"field {name!r} is not UTF-8 text") from None
    if isinstance(value, str):
        return value.strip()
    raise InvalidArgument(f"field {name!r} must be text, got {type(value).__name__}")


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value, name).lower() if not isinstance(value, int) else str(value)
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidArgument(f"field {name!r} must be true or false, got {text!r}")


def _integer(value: Any, name: str) -> int:
    """An int, an integral float (JSON ``7.0``, as the OIP takes an integral double) or decimal
    text; the message quotes at most 40 characters of anything else."""
    if isinstance(value, bool):
        raise InvalidArgument(f"field {name!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = _text(value, name) if not isinstance(value, float) else repr(value)
    try:
        return int(text)
    except ValueError:  # also text of more than 4,300 digits
        raise InvalidArgument(f"field {name!r} must be an integer, got {text[:40]!r}") from None


def _resolution(value: Any) -> str:
    text = _text(value, "resolution") or "input"
    if text not in RESOLUTIONS:
        raise InvalidArgument(f"resolution must be one of {list(RESOLUTIONS)}, got {text!r}")
    return text
