"""`GET /items?path=|user_id=`, `GET /items/{id}`, `GET /images/{id}`: records and files the
index holds (never a caller's path)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path as PathParam, Query
from fastapi.responses import FileResponse

from indexer.results import SearchError

from ..dependencies import current_handle, get_engine, require_key
from ..engine import Engine, IndexHandle
from ..errors import ClientError
from ..responses import item_out
from . import ERRORS

router = APIRouter(tags=["items"], dependencies=[Depends(require_key)])
READ_ERRORS = ERRORS(401, 404, 422, 503)
MAX_ID = 2**63 - 1


@router.get("/items", responses=READ_ERRORS, summary="The image stored under a collection path, or with a captions-file id")
async def find_item(path: str | None = Query(None, min_length=1, max_length=4096,
                                             description="path relative to the images folder, as hits give it"),
                    user_id: str | None = Query(None, min_length=1, max_length=1024,
                                                description="the image's id in the captions file"),
                    engine: Engine = Depends(get_engine), handle: IndexHandle = Depends(current_handle)
                    ) -> dict[str, Any]:
    if (path is None) == (user_id is None):
        raise ClientError(422, "give exactly one of the query parameters 'path' and 'user_id'")
    try:
        item = (await engine.run(handle.searcher.item_by_path, path) if path is not None
                else await engine.run(handle.searcher.item_by_user_id, user_id))
    except SearchError as e:  # e.g. an index from before user ids
        raise ClientError(422, str(e).splitlines()[0]) from None
    if item is None:
        raise ClientError(404, f"no image with path {path!r}" if path is not None else f"no image with user_id "
                               f"{user_id!r}")
    return item_out(item)


@router.get("/items/{item_id}", responses=READ_ERRORS, summary="One image or caption record")
async def get_item(item_id: int = PathParam(..., ge=0, le=MAX_ID), engine: Engine = Depends(get_engine),
                   handle: IndexHandle = Depends(current_handle)) -> dict[str, Any]:
    item = await engine.run(handle.searcher.item, item_id)  # blocking (SQLite, or a shard's answer): off the loop
    if item is None:
        raise ClientError(404, f"no item with id {item_id}")
    return item_out(item)


@router.get("/images/{image_id}", responses={**READ_ERRORS, 200: {"content": {"image/*": {}}}},
            response_class=FileResponse, summary="The image file (only files the index holds)")
async def get_image(image_id: int = PathParam(..., ge=0, le=MAX_ID), engine: Engine = Depends(get_engine),
                    handle: IndexHandle = Depends(current_handle)) -> FileResponse:
    path = await engine.run(handle.searcher.image_path, image_id)
    if path is None or not path.is_file():
        raise ClientError(404, f"no image with id {image_id}")
    return FileResponse(path, headers={"Cache-Control": "no-cache"})
