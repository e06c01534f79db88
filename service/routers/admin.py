"""`POST /admin/reload`: hot-swap the index (included only with `allow_admin`)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials

from ..dependencies import api_key_header, bearer_scheme, check_key, get_engine, presented
from ..engine import Engine, IndexLoadError
from ..errors import ClientError
from ..models import ReloadRequest, ReloadResponse
from ..responses import index_ref
from . import ERRORS

router = APIRouter(tags=["admin"])
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@router.post("/admin/reload", response_model=ReloadResponse, responses=ERRORS(400, 401, 403, 409, 422, 503),
             summary="Hot-swap the index (atomically; in-flight requests finish on the old one)")
async def admin_reload(request: Request, body: ReloadRequest | None = None, engine: Engine = Depends(get_engine),
                       header: str | None = Security(api_key_header),
                       bearer: HTTPAuthorizationCredentials | None = Security(bearer_scheme)) -> ReloadResponse:
    key = engine.settings.effective_admin_key
    if key is None:
        host = request.client.host if request.client else ""
        if host not in LOOPBACK:
            raise ClientError(403, "admin calls without a configured admin key are allowed from loopback only")
    else:
        check_key(key, presented(header, bearer))
    target = body.index_dir if body and body.index_dir else None
    t0 = time.perf_counter()
    try:
        handle = await engine.load(target)
    except IndexLoadError as e:
        raise ClientError(400 if target else 503, str(e)) from None
    peers = request.app.state.peers
    if peers is not None:  # the other worker processes load the same index
        peers.announce(handle.index_dir)
    return ReloadResponse(index=index_ref(handle), load_seconds=round(time.perf_counter() - t0, 4))
