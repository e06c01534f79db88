"""`/healthz`, `/readyz`, `/metrics` (and `/openapi.json` behind the key when ops are protected)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..dependencies import get_engine, may_see_details, require_key, require_key_for_ops
from ..engine import Engine, NotReady
from ..models import HealthResponse, ReadyResponse
from ..responses import index_ref, public_info
from . import ERRORS

router = APIRouter(tags=["ops"])
keyed_openapi = APIRouter()  # included only when ops are protected: FastAPI's own /openapi.json is off then


@router.get("/healthz", response_model=HealthResponse, summary="The process answers")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            response_model_exclude_none=True,
            summary="Index loaded and not failing verification; with the key (when one is set): which index")
async def readyz(request: Request, engine: Engine = Depends(get_engine)) -> Any:
    detailed = may_see_details(request)
    try:
        engine.handle
        ok, message = True, "ready"
    except NotReady as e:
        ok, message = False, str(e) if detailed else _public_reason(engine)
    h = engine.served
    body = ReadyResponse(ready=ok, message=message, verified=h.verification.state if h is not None else None)
    if detailed and h is not None:
        body.index, body.info = index_ref(h), public_info(h.searcher.info)
        body.verification = h.verification.summary()
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": "1"})


@router.get("/metrics", summary="Prometheus metrics (needs the key when one is set)",
            responses={200: {"content": {"text/plain": {}}}, **ERRORS(401)}, response_class=Response,
            dependencies=[Depends(require_key_for_ops)])
async def metrics(engine: Engine = Depends(get_engine)) -> Response:
    if engine.auto.per_candidate_s is not None:
        engine.metrics.auto_cost.set(engine.auto.per_candidate_s)
    return Response(engine.metrics.render(), media_type=engine.metrics.content_type)


@keyed_openapi.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_key)])
async def openapi_with_key(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


def _public_reason(engine: Engine) -> str:
    """Why not ready, for a caller without the key: no paths, no load errors."""
    if engine.loading and engine.served is None:
        return "the index is still loading"
    if engine.served is not None:
        return "the index failed verification"
    return "no index loaded"
