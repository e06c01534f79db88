"""What a search returns: ranked hits with their score breakdown (the service's contract types).

Kept apart from the engine (`indexer.searcher`) so the service, a sharded fan-out and test
doubles share them without loading FAISS or torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class SearchError(ValueError):
    """A request the index cannot answer (bad mode, bad filter, ...), with the reason."""


@dataclass
class Hit:
    id: int
    score: float
    global_score: float
    local_score: float | None
    kind: str
    metadata: dict = field(default_factory=dict)
    path: str | None = None  # the image's path relative to the collection's images folder
    caption: str | None = None
    image_id: int | None = None
    alignment: list[dict] | None = None
    user_id: str | int | None = None  # the captions file's own id of the image (`--id-field`)
    # calibrated probability that the hit matches the query (`encoder.confidence`); None for
    # image->image search and for a checkpoint without a calibration
    confidence: float | None = None
    label_score: float | None = None  # the label route's part of global_score (None: no route)


@dataclass
class SearchResult:
    hits: list[Hit]
    timings: dict[str, float]
    candidates: int
