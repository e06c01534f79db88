"""What the service needs from a search engine: the one typed border between `service` and
whatever answers queries (`indexer.searcher.Searcher` over one index, a sharded fan-out over
several, or a test double in `tests/`).

The service calls nothing else on it, so anything implementing this protocol serves the same
API, errors and page. Results are `indexer.results` types; a request the index cannot answer
raises `indexer.results.SearchError` (HTTP 400 with its message).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from indexer.results import SearchResult


@runtime_checkable
class SearchBackend(Protocol):
    info: dict[str, Any]  # public facts about the index (counts, dims, FAISS kind); never server paths
    metadata_fields: set[str]  # fields a filter may name
    grid: tuple[int, int] | None  # the image token grid (rows, cols) behind `alignment` cells

    def search_text(self, query: str, k: int = 10, candidates: int = 100, mode: str = "rerank",
                    filters: dict | None = None, explain: bool = False) -> SearchResult: ...

    def search_image(self, image: Image.Image, k: int = 10, candidates: int = 100, mode: str = "rerank",
                     filters: dict | None = None, target: str = "captions", explain: bool = False
                     ) -> SearchResult: ...

    def item(self, id: int) -> dict | None: ...

    def item_by_path(self, path: str) -> dict | None: ...

    def item_by_user_id(self, user_id: str | int) -> dict | None: ...

    def image_path(self, id: int) -> Path | None: ...

    def rerank_cost(self) -> float:
        """Measured seconds per re-ranked candidate (drives `candidates: "auto"`)."""
        ...
