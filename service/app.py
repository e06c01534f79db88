"""FastAPI app factory: `uvicorn --factory service.app:create_app`, or `service --index DIR`.

A query's path: `routers/search.py` (validate, pick the depth) -> `indexer/searcher.py`
(`Searcher.search_text`: encode with `encoder/pipeline.py`, FAISS stage one) ->
`encoder/ranking.py` (exact scores, MrSw, fuse, order) -> `responses.py` (the response body).
Routers per concern (`routers/`) share the engine and the request's index handle through
`dependencies.py`; the searcher is anything implementing `contract.SearchBackend`.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from .accesslog import redact_access_log
from .contract import SearchBackend
from .dependencies import protected
from .engine import Engine, Loader, NotReady
from .errors import error_response, install_error_handlers
from .integrity import Verification
from .lifecycle import lifespan
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .peers import Peers
from .routers import admin, items, ops, page, search
from .settings import ServiceSettings


def create_app(settings: ServiceSettings | None = None, *, searcher: SearchBackend | None = None,
               loader: Loader | None = None, peers: Peers | None = None,
               verification: Verification | None = None) -> FastAPI:
    """Build the app. `searcher` serves an already loaded search backend (`verification`: what
    was checked of its files before it was opened, the rest is hashed in the background);
    otherwise the index in `settings.index_dir` is loaded at startup (in the background unless
    `background_load` is off). `peers` links a worker process to its siblings under `--workers N`.

    With an `api_key` set (and `public_ops` off), only the web page, /healthz and a minimal
    /readyz (ready or not, verified or not) answer without it; /metrics, /openapi.json and the
    details of /readyz need it, and /docs and /redoc are off (a browser cannot send the header)."""
    settings = settings or ServiceSettings()
    redact_access_log()
    metrics = Metrics()
    engine = Engine(settings, loader=loader, metrics=metrics)
    if searcher is not None:
        engine.install(searcher, settings.index_dir or Path("<memory>"), verification=verification)
    closed = {"docs_url": None, "redoc_url": None, "openapi_url": None} if protected(settings) else {}
    app = FastAPI(title="TGDT image-text retrieval", version="0.1.0", lifespan=lifespan, **closed,
                  description="Two-stage (global FAISS + token re-rank) image-text search with word grounding.")
    app.state.engine, app.state.settings, app.state.peers = engine, settings, peers
    install_error_handlers(app)
    app.add_exception_handler(NotReady, _not_ready)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    for router in (search.router, items.router, ops.router, page.router):
        app.include_router(router)
    if protected(settings):
        app.include_router(ops.keyed_openapi)
    if settings.allow_admin:
        app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app


async def _not_ready(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, str(exc), headers={"Retry-After": "1"})
