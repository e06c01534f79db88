"""`POST /search/text` and `POST /search/image`: validate, run the engine's searcher off the
event loop on the request's index handle, answer with `responses.search_response`."""
from __future__ import annotations

import time
from typing import Any, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from encoder.transforms import ImageError, load_image
from indexer.results import SearchError, SearchResult

from ..dependencies import current_handle, get_engine, require_key
from ..engine import Engine, IndexHandle
from ..errors import ClientError
from ..models import SearchOptions, SearchResponse, TextSearchRequest
from ..responses import search_response
from ..settings import ServiceSettings
from ..uploads import image_request_body, read_image_request
from . import ERRORS

router = APIRouter(tags=["search"], dependencies=[Depends(require_key)])
SEARCH_ERRORS = ERRORS(400, 401, 413, 415, 422, 503)


@router.post("/search/text", response_model=SearchResponse, responses=SEARCH_ERRORS,
             summary="Text -> ranked images (explain: word grounding per hit)")
async def search_text(req: TextSearchRequest, engine: Engine = Depends(get_engine),
                      handle: IndexHandle = Depends(current_handle)) -> Response:
    t0 = time.perf_counter()
    settings = engine.settings
    if len(req.query) > settings.max_query_chars:
        raise ClientError(422, f"query too long: {len(req.query)} characters, the limit is {settings.max_query_chars}")
    candidates, auto = _depth(req, handle, engine, settings)
    result = await _run(engine, handle.searcher.search_text, req.query, k=req.k, candidates=candidates,
                        mode=req.mode, filters=req.filters or None, explain=req.explain)
    return search_response(engine, handle, "text", req, result, auto, t0)


@router.post("/search/image", response_model=SearchResponse, responses=SEARCH_ERRORS,
             summary="Image -> ranked captions (target=images: similar images)",
             openapi_extra={"requestBody": image_request_body()})
async def search_image(request: Request, engine: Engine = Depends(get_engine),
                       handle: IndexHandle = Depends(current_handle)) -> Response:
    t0 = time.perf_counter()
    opts, data, declared = await read_image_request(request, engine.settings)
    try:
        image = await engine.run(load_image, data)
    except ImageError as e:
        if declared and not declared.startswith("image/") and declared != "application/octet-stream":
            raise ClientError(415, f"unsupported media type {declared}: not an image ({e})") from None
        raise ClientError(400, f"unreadable image: {e}") from None
    candidates, auto = _depth(opts, handle, engine, engine.settings)
    result = await _run(engine, handle.searcher.search_image, image, k=opts.k, candidates=candidates,
                        mode=opts.mode, filters=opts.filters or None, target=opts.target)
    return search_response(engine, handle, "image", opts, result, auto, t0)


def _depth(opts: SearchOptions, handle: IndexHandle, engine: Engine, settings: ServiceSettings) -> tuple[int, bool]:
    """Check the settings' (tighter) bounds and filters; pick the re-rank depth."""
    if opts.k > settings.max_k:
        if "k" in opts.model_fields_set:
            raise ClientError(422, f"k must be between 1 and {settings.max_k}")
        opts.k = settings.max_k  # the schema default is above this deployment's ceiling
    if opts.filters:
        known = handle.searcher.metadata_fields
        unknown = sorted(set(opts.filters) - known)
        if unknown:
            raise ClientError(422, f"unknown filter field(s) {unknown}; filterable fields: {sorted(known)}")
    if opts.candidates == "auto":
        return engine.auto.pick(opts.k), True
    c = settings.default_candidates if opts.candidates is None else int(opts.candidates)
    if c > settings.max_candidates:
        raise ClientError(422, f"candidates must be between 1 and {settings.max_candidates} (or 'auto')")
    return max(c, opts.k), False


async def _run(engine: Engine, fn: Callable[..., SearchResult], *args: Any, **kwargs: Any) -> SearchResult:
    try:
        return await engine.run(fn, *args, **kwargs)
    except SearchError as e:  # the searcher's word on a client input it cannot serve (e.g. a filter value)
        raise ClientError(422, str(e).splitlines()[0] if str(e) else "invalid search request") from None
