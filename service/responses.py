"""Search results and item records as the API sends them (`service.models`), never a server path."""
from __future__ import annotations

import math
import time
from typing import Any

from fastapi.responses import Response

from indexer.results import Hit, SearchResult

from .engine import Engine, IndexHandle
from .models import HitOut, IndexRef, SearchOptions, SearchResponse, Timings, WordCell, confident

# What /readyz tells a caller without the key (when one is set): the index summary minus server paths.
PUBLIC_INFO = ("format_version", "created", "updated", "images", "captions", "deleted_images", "deleted_captions",
               "dim", "grid", "image_tokens", "token_form", "token_bytes_per_image", "faiss", "bytes")
PUBLIC_MODEL = ("checkpoint_digest", "image_backbone", "text_backbone", "embed_dim")


def search_response(engine: Engine, handle: IndexHandle, endpoint: str, opts: SearchOptions, result: SearchResult,
                    auto: bool, t0: float) -> Response:
    """The response of one search, with its stage timings recorded in the metrics and the
    adaptive depth's cost model."""
    timings = result.timings
    used = result.candidates
    engine.metrics.observe_stages(endpoint, timings)
    if opts.mode == "rerank" and used > 0 and "rerank" in timings:
        engine.auto.observe(used, float(timings["rerank"]))
        engine.metrics.candidates.observe(used)
    grid = handle.searcher.grid
    hits = [hit_out(h) for h in confident(result.hits, opts.min_confidence)]
    ms = {k: round(float(v) * 1000.0, 3) for k, v in timings.items() if k in ("encode", "faiss", "rerank", "total", "fanout")}
    ms["request"] = round((time.perf_counter() - t0) * 1000.0, 3)
    body = SearchResponse(hits=hits, mode=opts.mode, k=opts.k, candidates=used, candidates_auto=auto,
                          timings_ms=Timings(**ms), grid=grid, index=index_ref(handle))
    # already a validated SearchResponse: serialise it once here instead of letting FastAPI
    # re-validate it and walk it through jsonable_encoder (a third of the framework's time per search)
    return Response(body.model_dump_json(), media_type="application/json")


def hit_out(h: Hit) -> HitOut:
    image_id = h.id if h.kind == "image" else h.image_id
    return HitOut(id=h.id, kind=h.kind, score=_num(h.score), global_score=_num(h.global_score),
                  local_score=_opt_num(h.local_score), label_score=_opt_num(h.label_score),
                  confidence=None if h.confidence is None else min(1.0, max(0.0, _num(h.confidence))),
                  image_id=image_id, image_url=f"/images/{image_id}" if image_id is not None else None,
                  caption=h.caption, path=client_path(h.path), user_id=h.user_id, metadata=jsonable(h.metadata),
                  alignment=None if h.alignment is None else [WordCell(**a) for a in h.alignment])


def item_out(item: dict) -> dict[str, Any]:
    """An item record for clients: collection-relative path, and the URL that serves its image."""
    out = {k: jsonable(v) for k, v in item.items()}
    out["path"] = client_path(out.get("path"))
    image_id = out.get("id") if out.get("kind") == "image" else out.get("image_id")
    out["image_url"] = f"/images/{image_id}" if isinstance(image_id, int) else None
    return out


def client_path(p: str | None) -> str | None:
    """A collection-relative path for clients; a server path (absolute) is never sent."""
    if not p or p.startswith(("/", "\\")) or (len(p) > 1 and p[1] == ":"):
        return None
    return p


def index_ref(h: IndexHandle) -> IndexRef:
    return IndexRef(generation=h.generation, index_dir=str(h.index_dir))


def public_info(info: dict[str, Any]) -> dict:
    """The index summary /readyz shows: counts, sizes, model and FAISS form; never server paths
    (the index's path, its images root, the captions file, the checkpoint folder)."""
    out = {k: info[k] for k in PUBLIC_INFO if k in info}
    if isinstance(info.get("model"), dict):
        out["model"] = {k: info["model"][k] for k in PUBLIC_MODEL if k in info["model"]}
    return jsonable(out)


def _num(v: float) -> float:
    """Scores as JSON-safe floats (JSON has no NaN/inf; a non-finite score would be a 500)."""
    return float(v) if math.isfinite(v) else 0.0


def _opt_num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def jsonable(v: Any) -> Any:
    """Metadata may hold numpy scalars or odd types from the index; make them JSON-safe."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [jsonable(x) for x in v]
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item):
        return jsonable(item())
    return str(v)
