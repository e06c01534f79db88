"""FastAPI app factory: `uvicorn --factory service.app:create_app`, or `service --index DIR`.

Routes are thin: validate (4xx with a message), read the index handle once, run the Searcher
off the event loop, turn its result into the response model. The search itself is the same
`Searcher` the indexer CLI and the evaluation use.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import secrets
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Path as PathParam, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from encoder.transforms import ImageError, load_image

from .accesslog import redact_access_log
from .engine import Engine, IndexHandle, IndexLoadError, Loader, NotReady
from .errors import ClientError, error_response, install_error_handlers
from .integrity import Verification
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .models import (
    ErrorBody,
    HealthResponse,
    HitOut,
    ImageSearchRequest,
    IndexRef,
    ReadyResponse,
    ReloadRequest,
    ReloadResponse,
    SearchOptions,
    SearchResponse,
    TextSearchRequest,
    Timings,
    WordCell,
    confident,
)
from .settings import ServiceSettings

log = logging.getLogger("service")
STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
MAX_ID = 2**63 - 1

_ERR = {"model": ErrorBody}
SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {400: _ERR, 401: _ERR, 413: _ERR, 415: _ERR, 422: _ERR, 503: _ERR}
READ_ERRORS: dict[int | str, dict[str, Any]] = {401: _ERR, 404: _ERR, 422: _ERR, 503: _ERR}

# The key travels in a header only: a URL (query string) ends up in access logs, proxies and browser history.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)
# What /readyz tells a caller without the key (when one is set): the index summary minus server paths.
PUBLIC_INFO = ("format_version", "created", "updated", "images", "captions", "deleted_images", "deleted_captions",
               "dim", "grid", "image_tokens", "token_form", "token_bytes_per_image", "faiss", "bytes")
PUBLIC_MODEL = ("checkpoint_digest", "image_backbone", "text_backbone", "embed_dim")


def create_app(settings: ServiceSettings | None = None, *, searcher: Any = None, loader: Loader | None = None,
               peers: Any = None, verification: Verification | None = None) -> FastAPI:
    """Build the app. `searcher` serves an already loaded Searcher (`verification`: what was
    checked of its files before it was opened, the rest is hashed in the background); otherwise
    the index in `settings.index_dir` is loaded at startup (in the background unless
    `background_load` is off). `peers` (`service.workers.Peers`) links a worker process to its
    siblings under `--workers N`.

    With an `api_key` set (and `public_ops` off), only the web page, /healthz and a minimal
    /readyz (ready or not, verified or not) answer without it; /metrics, /openapi.json and the
    details of /readyz need it, and /docs and /redoc are off (a browser cannot send the header)."""
    settings = settings or ServiceSettings()
    redact_access_log()
    metrics = Metrics()
    engine = Engine(settings, loader=loader, metrics=metrics)
    if searcher is not None:
        from .engine import initial_cost

        engine.install(searcher, settings.index_dir or Path("<memory>"), initial_cost=initial_cost(searcher),
                       verification=verification)
    protected = settings.api_key is not None and not settings.public_ops

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        announced = peers.claim() if peers is not None else None  # what the sibling workers serve now
        if not engine.ready and settings.index_dir is not None:
            seq, first = announced if announced else (None, None)
            if settings.background_load:
                engine.loading = True
                task = asyncio.create_task(_load_logged(engine, first, peers, seq))  # marks it applied once loaded
            else:
                await engine.load(first)
                if seq is not None:
                    peers.applied = seq
        redact_access_log()  # again, in case the server's logging setup ran after create_app
        handlers = _install_signals(engine, peers)
        try:
            yield
        finally:
            for sig in handlers:
                asyncio.get_running_loop().remove_signal_handler(sig)
            if task is not None and not task.done():
                task.cancel()
            engine.close()

    closed = {"docs_url": None, "redoc_url": None, "openapi_url": None} if protected else {}
    app = FastAPI(title="TGDT image-text retrieval", version="0.1.0", lifespan=lifespan, **closed,
                  description="Two-stage (global FAISS + token re-rank) image-text search with word grounding.")
    app.state.engine = engine
    app.state.settings = settings
    install_error_handlers(app)
    app.add_exception_handler(NotReady, _not_ready)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    async def require_key(header: str | None = Security(_api_key_header),
                          bearer: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
        # async: a plain `def` dependency costs every request a hop through the thread pool
        _check_key(settings.api_key, _presented(header, bearer))

    async def require_key_for_ops(header: str | None = Security(_api_key_header),
                                  bearer: HTTPAuthorizationCredentials | None = Security(_bearer)) -> None:
        if protected:
            _check_key(settings.api_key, _presented(header, bearer))

    def may_see_details(request: Request) -> bool:
        if not protected:
            return True
        given = _presented(request.headers.get("x-api-key"), _bearer_of(request.headers.get("authorization")))
        return any(_key_matches(k, given) for k in (settings.api_key, settings.admin_key) if k is not None)

    # --- search --------------------------------------------------------------------------------
    @app.post("/search/text", response_model=SearchResponse, responses=SEARCH_ERRORS, tags=["search"],
              summary="Text -> ranked images (explain: word grounding per hit)")
    async def search_text(req: TextSearchRequest, _: None = Depends(require_key)) -> Response:
        t0 = time.perf_counter()
        if len(req.query) > settings.max_query_chars:
            raise ClientError(422, f"query too long: {len(req.query)} characters, the limit is "
                                   f"{settings.max_query_chars}")
        handle = engine.handle
        candidates, auto = _resolve(req, handle, engine, settings)
        result = await _run_search(engine, handle.searcher.search_text, req.query, k=req.k, candidates=candidates,
                                   mode=req.mode, filters=req.filters or None, explain=req.explain)
        return _respond(engine, handle, "text", req, result, auto, t0)

    @app.post("/search/image", response_model=SearchResponse, responses=SEARCH_ERRORS, tags=["search"],
              summary="Image -> ranked captions (target=images: similar images)",
              openapi_extra={"requestBody": _image_request_body()})
    async def search_image(request: Request, _: None = Depends(require_key)) -> Response:
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            opts, data, declared = await _image_from_json(request)
        elif ctype == "multipart/form-data":
            opts, data, declared = await _image_from_form(request, settings)
        else:
            raise ClientError(415, f"unsupported content type {ctype or '(none)'}: send multipart/form-data with "
                                   "a 'file' field, or application/json with 'image_b64'")
        try:
            image = await engine.run(load_image, data)
        except ImageError as e:
            if declared and not declared.startswith("image/") and declared != "application/octet-stream":
                raise ClientError(415, f"unsupported media type {declared}: not an image ({e})") from None
            raise ClientError(400, f"unreadable image: {e}") from None
        handle = engine.handle
        candidates, auto = _resolve(opts, handle, engine, settings)
        result = await _run_search(engine, handle.searcher.search_image, image, k=opts.k, candidates=candidates,
                                   mode=opts.mode, filters=opts.filters or None, target=opts.target)
        return _respond(engine, handle, "image", opts, result, auto, t0)

    # --- items and images ------------------------------------------------------------------------
    @app.get("/items", responses=READ_ERRORS, tags=["items"],
             summary="The image stored under a collection path, or with a captions-file id")
    async def find_item(path: str | None = Query(None, min_length=1, max_length=4096,
                                                 description="path relative to the images folder, as hits give it"),
                        user_id: str | None = Query(None, min_length=1, max_length=1024,
                                                    description="the image's id in the captions file"),
                        _: None = Depends(require_key)) -> dict[str, Any]:
        if (path is None) == (user_id is None):
            raise ClientError(422, "give exactly one of the query parameters 'path' and 'user_id'")
        searcher = engine.handle.searcher
        try:
            item = (await engine.run(searcher.item_by_path, path) if path is not None
                    else await engine.run(searcher.item_by_user_id, user_id))
        except ValueError as e:  # e.g. an index from before user ids
            raise ClientError(422, str(e).splitlines()[0]) from None
        if item is None:
            raise ClientError(404, f"no image with path {path!r}" if path is not None else f"no image with user_id "
                                   f"{user_id!r}")
        return _item_out(item)

    @app.get("/items/{item_id}", responses=READ_ERRORS, tags=["items"], summary="One image or caption record")
    async def get_item(item_id: int = PathParam(..., ge=0, le=MAX_ID), _: None = Depends(require_key)
                       ) -> dict[str, Any]:
        item = engine.handle.searcher.item(item_id)
        if item is None:
            raise ClientError(404, f"no item with id {item_id}")
        return _item_out(item)

    @app.get("/images/{image_id}", responses={**READ_ERRORS, 200: {"content": {"image/*": {}}}},
             response_class=FileResponse, tags=["items"], summary="The image file (only files the index holds)")
    async def get_image(image_id: int = PathParam(..., ge=0, le=MAX_ID), _: None = Depends(require_key)
                        ) -> FileResponse:
        path = engine.handle.searcher.image_path(image_id)
        if path is None or not Path(path).is_file():
            raise ClientError(404, f"no image with id {image_id}")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    # --- operations ------------------------------------------------------------------------------
    @app.get("/healthz", response_model=HealthResponse, tags=["ops"], summary="The process answers")
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}}, tags=["ops"],
             response_model_exclude_none=True,
             summary="Index loaded and not failing verification; with the key (when one is set): which index")
    async def readyz(request: Request) -> Any:
        detailed = may_see_details(request)
        try:
            engine.handle
            ok, message = True, "ready"
        except NotReady as e:
            ok, message = False, str(e) if detailed else _public_reason(engine)
        h = engine.served
        body = ReadyResponse(ready=ok, message=message, verified=h.verification.state if h is not None else None)
        if detailed and h is not None:
            body.index, body.info = _ref(h), _public_info(getattr(h.searcher, "info", None))
            body.verification = h.verification.summary()
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": "1"})

    if protected:
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi_with_key(_: None = Depends(require_key)) -> JSONResponse:
            return JSONResponse(app.openapi())

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (needs the key when one is set)",
             responses={200: {"content": {"text/plain": {}}}, 401: _ERR}, response_class=Response)
    async def metrics_endpoint(_: None = Depends(require_key_for_ops)) -> Response:
        if engine.auto.per_candidate_s is not None:
            metrics.auto_cost.set(engine.auto.per_candidate_s)
        return Response(metrics.render(), media_type=metrics.content_type)

    if settings.allow_admin:
        @app.post("/admin/reload", response_model=ReloadResponse, tags=["admin"],
                  responses={400: _ERR, 401: _ERR, 403: _ERR, 409: _ERR, 422: _ERR, 503: _ERR},
                  summary="Hot-swap the index (atomically; in-flight requests finish on the old one)")
        async def admin_reload(request: Request, body: ReloadRequest | None = None,
                               header: str | None = Security(_api_key_header),
                               bearer: HTTPAuthorizationCredentials | None = Security(_bearer)) -> ReloadResponse:
            key = settings.effective_admin_key
            if key is None:
                host = request.client.host if request.client else ""
                if host not in LOOPBACK:
                    raise ClientError(403, "admin calls without a configured admin key are allowed from "
                                           "loopback only")
            else:
                _check_key(key, _presented(header, bearer))
            target = body.index_dir if body and body.index_dir else None
            t0 = time.perf_counter()
            try:
                handle = await engine.load(target)
            except IndexLoadError as e:
                raise ClientError(400 if target else 503, str(e)) from None
            if peers is not None:  # the other worker processes load the same index
                peers.announce(handle.index_dir)
            return ReloadResponse(index=_ref(handle), load_seconds=round(time.perf_counter() - t0, 4))

    # --- the web page ---------------------------------------------------------------------------
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(page)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# --- helpers -----------------------------------------------------------------------------------
async def _load_logged(engine: Engine, target: Path | None = None, peers: Any = None, seq: int | None = None
                       ) -> None:
    try:
        await engine.load(target)
    except IndexLoadError as e:
        log.error("%s", e)
        return
    if peers is not None and seq is not None:
        peers.applied = seq


def _install_signals(engine: Engine, peers: Any) -> list[int]:
    """SIGHUP reloads the configured index dir (point a symlink at a new version, then HUP);
    under `--workers`, the reload signal loads the index a sibling announced."""
    if not hasattr(signal, "SIGHUP"):
        return []

    def on_hup() -> None:
        log.info("SIGHUP: reloading %s", engine.settings.index_dir)
        asyncio.ensure_future(_load_logged(engine))

    def on_announce() -> None:
        pending = peers.claim()
        if pending is not None:
            log.info("a sibling worker announced %s: loading it", pending[1])
            asyncio.ensure_future(_load_logged(engine, pending[1], peers, pending[0]))

    wanted = [(signal.SIGHUP, on_hup)]
    if peers is not None:
        from .workers import RELOAD_SIGNAL

        wanted.append((RELOAD_SIGNAL, on_announce))
    installed = []
    for sig, fn in wanted:
        try:
            asyncio.get_running_loop().add_signal_handler(sig, fn)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread (tests), or no signals
            break
        installed.append(sig)
    return installed


async def _not_ready(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, str(exc), headers={"Retry-After": "1"})


def _presented(header: str | None, bearer: HTTPAuthorizationCredentials | str | None) -> str | None:
    """The key a request presents: the X-API-Key header, else an `Authorization: Bearer` token."""
    if isinstance(bearer, HTTPAuthorizationCredentials):
        bearer = bearer.credentials
    return header or bearer or None


def _bearer_of(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _key_matches(expected: Any, given: str | None) -> bool:
    return bool(given) and secrets.compare_digest(given.encode(), expected.get_secret_value().encode())


def _check_key(expected: Any, given: str | None) -> None:
    if expected is None:
        return
    if not _key_matches(expected, given):
        raise ClientError(401, "missing or wrong API key (send it in the X-API-Key header or as "
                               "Authorization: Bearer; never in the URL)", headers={"WWW-Authenticate": "Bearer"})


def _public_reason(engine: Engine) -> str:
    """Why not ready, for a caller without the key: no paths, no load errors."""
    if engine.loading and engine.served is None:
        return "the index is still loading"
    if engine.served is not None:
        return "the index failed verification"
    return "no index loaded"


def _public_info(info: Any) -> dict | None:
    """The index summary /readyz shows: counts, sizes, model and FAISS form; never server paths
    (the index's path, its images root, the captions file, the checkpoint folder)."""
    if not isinstance(info, dict):
        return None
    out = {k: info[k] for k in PUBLIC_INFO if k in info}
    if isinstance(info.get("model"), dict):
        out["model"] = {k: info["model"][k] for k in PUBLIC_MODEL if k in info["model"]}
    return _jsonable(out)


def _resolve(opts: SearchOptions, handle: IndexHandle, engine: Engine, settings: ServiceSettings
             ) -> tuple[int, bool]:
    """Check the settings' (tighter) bounds and filters; pick the re-rank depth."""
    if opts.k > settings.max_k:
        if "k" in opts.model_fields_set:
            raise ClientError(422, f"k must be between 1 and {settings.max_k}")
        opts.k = settings.max_k  # the schema default is above this deployment's ceiling
    if opts.filters:
        known = handle.metadata_fields
        unknown = sorted(set(opts.filters) - known)
        if unknown:
            raise ClientError(422, f"unknown filter field(s) {unknown}; filterable fields: {sorted(known)}")
    if opts.candidates == "auto":
        return engine.auto.pick(opts.k), True
    c = settings.default_candidates if opts.candidates is None else int(opts.candidates)
    if c > settings.max_candidates:
        raise ClientError(422, f"candidates must be between 1 and {settings.max_candidates} (or 'auto')")
    return max(c, opts.k), False


async def _run_search(engine: Engine, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return await engine.run(fn, *args, **kwargs)
    except ValueError as e:  # the Searcher's word on a client input it cannot serve (e.g. a filter value)
        raise ClientError(422, str(e).splitlines()[0] if str(e) else "invalid search request") from None


def _ref(h: IndexHandle) -> IndexRef:
    return IndexRef(generation=h.generation, index_dir=str(h.index_dir))


def _respond(engine: Engine, handle: IndexHandle, endpoint: str, opts: SearchOptions, result: Any, auto: bool,
             t0: float) -> Response:
    timings = dict(getattr(result, "timings", {}) or {})
    used = int(getattr(result, "candidates", 0) or 0)
    engine.metrics.observe_stages(endpoint, timings)
    if opts.mode == "rerank" and used > 0 and timings.get("rerank") is not None:
        engine.auto.observe(used, float(timings["rerank"]))
        engine.metrics.candidates.observe(used)
    hits = confident(result.hits, opts.min_confidence)
    hits = [_hit(h, handle.grid) for h in hits]
    ms = {k: round(float(v) * 1000.0, 3) for k, v in timings.items() if k in ("encode", "faiss", "rerank", "total")
          and _finite(v)}
    ms["request"] = round((time.perf_counter() - t0) * 1000.0, 3)
    body = SearchResponse(hits=hits, mode=opts.mode, k=opts.k, candidates=used, candidates_auto=auto,
                          timings_ms=Timings(**ms), grid=handle.grid, index=_ref(handle))
    # already a validated SearchResponse: serialise it once here instead of letting FastAPI
    # re-validate it and walk it through jsonable_encoder (a third of the framework's time per search)
    return Response(body.model_dump_json(), media_type="application/json")


def _hit(h: Any, grid: tuple[int, int] | None) -> HitOut:
    kind = getattr(h, "kind", "image") or "image"
    image_id = int(h.id) if kind == "image" else _opt_int(getattr(h, "image_id", None))
    alignment = getattr(h, "alignment", None)
    cells = None
    if alignment is not None:
        cells = []
        for a in alignment:
            cell = int(a.get("cell", -1))
            row, col = a.get("row"), a.get("col")
            if (row is None or col is None) and grid and cell >= 0:
                row, col = divmod(cell, grid[1])
            cells.append(WordCell(word=str(a.get("word", "")), content=bool(a.get("content", True)), cell=cell,
                                  row=int(row if row is not None else -1),
                                  col=int(col if col is not None else -1), score=_num(a.get("score", 0.0))))
    local = getattr(h, "local_score", None)
    conf = getattr(h, "confidence", None)
    label = getattr(h, "label_score", None)
    return HitOut(id=int(h.id), kind=kind, score=_num(h.score), global_score=_num(getattr(h, "global_score", h.score)),
                  local_score=None if local is None or not _finite(local) else float(local),
                  label_score=None if label is None or not _finite(label) else float(label),
                  confidence=None if conf is None or not _finite(conf) else min(1.0, max(0.0, float(conf))),
                  image_id=image_id,
                  image_url=f"/images/{image_id}" if image_id is not None else None,
                  caption=getattr(h, "caption", None), path=_client_path(getattr(h, "path", None)),
                  user_id=_user_id(getattr(h, "user_id", None)), metadata=_jsonable(getattr(h, "metadata", None) or {}),
                  alignment=cells)


def _client_path(p: Any) -> str | None:
    """A collection-relative path for clients; a server path (absolute) is never sent."""
    if not isinstance(p, str) or not p or p.startswith(("/", "\\")) or (len(p) > 1 and p[1] == ":"):
        return None
    return p


def _item_out(item: dict) -> dict[str, Any]:
    """An item record for clients: collection-relative path, and the URL that serves its image."""
    out = {k: _jsonable(v) for k, v in dict(item).items()}
    out["path"] = _client_path(out.get("path"))
    image_id = out.get("id") if out.get("kind") == "image" else out.get("image_id")
    out["image_url"] = f"/images/{image_id}" if isinstance(image_id, int) else None
    return out


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _num(v: Any) -> float:
    """Scores as JSON-safe floats (JSON has no NaN/inf; a non-finite score would be a 500)."""
    return float(v) if _finite(v) else 0.0


def _user_id(v: Any) -> str | int | None:
    if v is None or isinstance(v, (str, int)) and not isinstance(v, bool):
        return v
    return str(_jsonable(v))


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _jsonable(v: Any) -> Any:
    """Metadata may hold numpy scalars or odd types from the index; make them JSON-safe."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    item = getattr(v, "item", None)
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(v)


# --- image request parsing -------------------------------------------------------------------------
def _image_request_body() -> dict[str, Any]:
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
