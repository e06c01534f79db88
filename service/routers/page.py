"""`GET /`: the web page (search box, image drop, hits with their word grounding)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

STATIC = Path(__file__).resolve().parents[1] / "static"
PAGE = (STATIC / "index.html").read_text(encoding="utf-8")

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index_page() -> HTMLResponse:
    return HTMLResponse(PAGE)
