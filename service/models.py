"""Request and response bodies of the HTTP API (they are also the OpenAPI schema).

The static bounds here are the hard ceilings; `ServiceSettings` may tighten them at run time
(checked in the routes, answered with the same 422 shape).
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from indexer.results import Hit

from .settings import HARD_MAX_CANDIDATES, HARD_MAX_K, HARD_MAX_QUERY_CHARS

FilterValue = str | int | float | bool
Candidates = Annotated[int, Field(ge=1, le=HARD_MAX_CANDIDATES)] | Literal["auto"]


class SearchOptions(BaseModel):
    """Options shared by text and image search."""
    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, le=HARD_MAX_K, description="number of results")
    candidates: Candidates | None = Field(
        None, description="re-rank depth K (default from settings), or 'auto' to fit the latency budget")
    mode: Literal["rerank", "global"] = Field("rerank", description="'global' skips the token re-rank")
    filters: dict[str, FilterValue | list[FilterValue]] | None = Field(
        None, description="metadata equality filters; a list means any of its values")
    min_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="drop hits whose confidence is below this (after ranking, so fewer "
                                          "than k may come back); hits without a confidence are kept")


def confident(hits: list[Hit], min_confidence: float | None) -> list[Hit]:
    """The hits at or above `min_confidence`, in their order; a hit without a confidence
    (image->image, a model without a calibration) is kept."""
    if min_confidence is None:
        return list(hits)
    return [h for h in hits if h.confidence is None or not math.isfinite(h.confidence)
            or h.confidence >= min_confidence]


class TextSearchRequest(SearchOptions):
    query: str = Field(..., min_length=1, max_length=HARD_MAX_QUERY_CHARS, description="free text")
    explain: bool = Field(False, description="return the word -> image cell grounding of every hit")

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is empty (only whitespace)")
        if "\x00" in v:
            raise ValueError("query contains a NUL character")
        return v.strip()


class ImageSearchRequest(SearchOptions):
    """JSON form of the image search: the image as base64 (a data: URL prefix is accepted)."""
    image_b64: str = Field(..., min_length=1, description="base64-encoded image file (JPEG, PNG, ...)")
    target: Literal["captions", "images"] = Field("captions", description="rank captions, or similar images")


class WordCell(BaseModel):
    word: str
    content: bool = Field(True, description="a content word (false: punctuation or a function word, "
                                            "which a model with a word mask never scores)")
    cell: int
    row: int
    col: int
    score: float


class HitOut(BaseModel):
    id: int
    kind: str = Field(..., description="'image' or 'caption'")
    score: float = Field(..., description="final score (fused in rerank mode, global in global mode)")
    global_score: float
    local_score: float | None = None
    label_score: float | None = Field(None, description="the label route's part of global_score: the weighted "
                                      "ImageNet-label (ConSE) similarity; null for a model without the route")
    confidence: float | None = Field(None, description="calibrated probability in [0, 1] that the hit matches the "
                                     "query (fitted on validation matches); null for image->image search and "
                                     "for a model without a calibration")
    image_id: int | None = Field(None, description="image this hit shows (the caption's image for captions)")
    image_url: str | None = None
    caption: str | None = None
    path: str | None = Field(None, description="the image's file, relative to the collection's images folder")
    user_id: str | int | None = Field(None, description="the image's id in the captions file (indexer --id-field)")
    metadata: dict[str, Any] = Field(default_factory=dict)
    alignment: list[WordCell] | None = Field(None, description="explain: best image cell per query word")


class Timings(BaseModel):
    """Milliseconds per stage, as measured by the search engine, plus the whole request."""
    encode: float = 0.0
    faiss: float = 0.0
    rerank: float = 0.0
    total: float = 0.0
    request: float = 0.0
    fanout: float | None = Field(None, description="sharded deployments: wall time of the calls to the shards "
                                                     "(faiss and rerank are the slowest shard's own)")


class IndexRef(BaseModel):
    generation: int = Field(..., description="increments on every hot swap; one request sees one generation")
    index_dir: str


class SearchResponse(BaseModel):
    hits: list[HitOut]
    mode: str
    k: int
    candidates: int = Field(..., description="re-rank depth actually used")
    candidates_auto: bool = Field(False, description="true when the depth was picked for the latency budget")
    timings_ms: Timings
    grid: tuple[int, int] | None = Field(None, description="image token grid (rows, cols) for the alignment")
    index: IndexRef


class ErrorBody(BaseModel):
    status: int
    message: str
    errors: list[dict[str, Any]] | None = None


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index_dir: str | None = Field(None, max_length=4096, description="new index directory; default: reload the "
                                  "configured one (e.g. a symlink that now points at a new version)")


class ReloadResponse(BaseModel):
    index: IndexRef
    load_seconds: float


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    ready: bool
    message: str
    verified: str | None = Field(None, description="checksums of the served index: ok, pending (being hashed "
                                 "in the background), failed (not served), off, unchecked (no manifest)")
    index: IndexRef | None = Field(None, description="details: only with the key, when one is set")
    info: dict[str, Any] | None = Field(None, description="details: counts, sizes, model, FAISS parameters")
    verification: dict[str, Any] | None = Field(None, description="details: state, failing files, bytes hashed")
