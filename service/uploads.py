"""The body of `POST /search/image`: a multipart upload (`file` plus form fields) or JSON with
base64 (`image_b64`), read into the same `ImageSearchRequest` and the image's bytes."""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .errors import ClientError
from .models import ImageSearchRequest
from .settings import ServiceSettings


async def read_image_request(request: Request, settings: ServiceSettings) -> tuple[ImageSearchRequest, bytes, str | None]:
    """(options, image bytes, the media type the client declared) by the request's content type."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return await _image_from_json(request)
    if ctype == "multipart/form-data":
        return await _image_from_form(request, settings)
    raise ClientError(415, f"unsupported content type {ctype or '(none)'}: send multipart/form-data with "
                           "a 'file' field, or application/json with 'image_b64'")


def image_request_body() -> dict[str, Any]:
    json_schema = ImageSearchRequest.model_json_schema()
    form_schema = {
        "type": "object", "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "the image file"},
            "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
            "candidates": {"type": "string", "description": "an integer re-rank depth, or 'auto'"},
            "mode": {"type": "string", "enum": ["rerank", "global"], "default": "rerank"},
            "target": {"type": "string", "enum": ["captions", "images"], "default": "captions"},
            "filters": {"type": "string", "description": "JSON object of metadata filters"},
            "min_confidence": {"type": "number", "minimum": 0, "maximum": 1,
                               "description": "drop hits whose confidence is below this"},
        },
    }
    return {"required": True, "content": {"multipart/form-data": {"schema": form_schema},
                                          "application/json": {"schema": json_schema}}}


def _validate(model: type, data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]) from None


async def _image_from_json(request: Request) -> tuple[ImageSearchRequest, bytes, str | None]:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ClientError(400, "request body is not valid JSON") from None
    req = _validate(ImageSearchRequest, data)
    b64 = req.image_b64.strip()
    declared = None
    if b64.startswith("data:"):
        head, _, b64 = b64.partition(",")
        declared = head[5:].split(";")[0].strip().lower() or None
    try:
        img = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, "image_b64 is not valid base64") from None
    return req, img, declared


async def _image_from_form(request: Request, settings: ServiceSettings) -> tuple[ImageSearchRequest, bytes, str | None]:
    form = await request.form(max_files=1, max_fields=16, max_part_size=settings.max_request_bytes)
    upload = form.get("file") or form.get("image")
    if upload is None or isinstance(upload, str):
        raise ClientError(400, "multipart body has no image file: send it in a field named 'file'")
    data = await upload.read()
    declared = (upload.content_type or "").split(";")[0].strip().lower() or None
    fields: dict[str, Any] = {"image_b64": "-"}
    for name in ("k", "candidates", "mode", "target"):
        v = form.get(name)
        if isinstance(v, str) and v != "":
            fields[name] = v
    if isinstance(fields.get("candidates"), str) and fields["candidates"] != "auto":
        fields["candidates"] = _form_int(fields["candidates"], "candidates")
    if "k" in fields:
        fields["k"] = _form_int(fields["k"], "k")
    v = form.get("min_confidence")
    if isinstance(v, str) and v.strip():
        fields["min_confidence"] = _form_float(v, "min_confidence")
    f = form.get("filters")
    if isinstance(f, str) and f.strip():
        try:
            fields["filters"] = json.loads(f)
        except json.JSONDecodeError:
            raise ClientError(422, "filters must be a JSON object") from None
    return _validate(ImageSearchRequest, fields), data, declared


def _form_int(v: str, name: str) -> int:
    try:
        return int(v.strip())
    except ValueError:
        raise ClientError(422, f"{name} must be an integer") from None


def _form_float(v: str, name: str) -> float:
    try:
        return float(v.strip())
    except ValueError:
        raise ClientError(422, f"{name} must be a number") from None
