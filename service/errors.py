"""Every error leaves the service as JSON `{"status", "message", "errors"?}`.

Client mistakes are 4xx with a message a person can act on; only our own faults are 500, and
those carry no traceback or internals.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("service.errors")


class ClientError(StarletteHTTPException):
    """A 4xx raised from our own checks, with a message for the caller."""

    def __init__(self, status_code: int, message: str, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.errors = errors


def error_response(status: int, message: str, errors: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"status": status, "message": message}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


def _loc(err: dict[str, Any]) -> str:
    parts = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    return ".".join(parts) or "body"


def _clean(err: dict[str, Any]) -> dict[str, Any]:
    # `input` may echo a huge or binary body back; `ctx` may hold exception objects.
    return {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")), "type": err.get("type")}


def validation_message(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "invalid request"
    parts = [f"{_loc(e)}: {e.get('msg', 'invalid')}" for e in errors[:5]]
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"not found: {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_response(exc.status_code, message, getattr(exc, "errors", None), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "request body is not valid JSON", [_clean(e) for e in errors])
        return error_response(422, validation_message(errors), [_clean(e) for e in errors])

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")
