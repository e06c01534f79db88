"""The exact merge of N index shards' answers into the answer of one index over all of them.

Pure functions over `indexer.results` types (no Ray, no HTTP), used by the sharded backend
(`service.ray_backend.ShardedBackend`) and unit-tested on their own.

Ids. Shard s of N holds a disjoint slice of the collection with its own local ids; the served
id of its item `local` is `local * N + s`, so any id names its owning shard (`split_id`) and
`/items/{id}` and `/images/{id}` are answered by that shard alone.

Exact merge. Asked for `depth` = max(k, candidates) hits, every shard ranks its own top-`depth`
candidates by the global score and re-ranks all of them with the fused score. The union of the
shards' top-`depth` by global score contains the single index's top-`depth` candidates, so
taking the top-`depth` of the union by global score gives exactly the single index's candidate
set; ordering those by the fused score (a function of query and candidate only) gives the
single index's answer. This holds when stage one is exact (FAISS flat; an approximate IVF/HNSW
shard adds only its own approximation). Merging each shard's top-k by fused score instead
would differ whenever a shard's fused top-k reaches below the global top-`depth` cut
(`tests/test_shard_merge.py` checks both).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from indexer.results import Hit, SearchResult

# per-count fields of `Searcher.info` that add up over shards
SUMMED = ("images", "captions", "deleted_images", "deleted_captions", "bytes")


def global_id(shard: int, local: int | None, n: int) -> int | None:
    return None if local is None else int(local) * n + shard


def split_id(gid: int, n: int) -> tuple[int, int]:
    """(owning shard, its local id) of a served id."""
    return int(gid) % n, int(gid) // n


def globalize_hit(hit: Hit, shard: int, n: int) -> Hit:
    return dataclasses.replace(hit, id=global_id(shard, hit.id, n), image_id=global_id(shard, hit.image_id, n))


def globalize_item(item: dict | None, shard: int, n: int) -> dict | None:
    """A shard's item record with served ids (its `captions` texts need no change)."""
    if item is None:
        return None
    out = dict(item)
    out["id"] = global_id(shard, out["id"], n)
    if out.get("image_id") is not None:
        out["image_id"] = global_id(shard, out["image_id"], n)
    return out


def merge(results: Sequence[SearchResult], k: int, depth: int) -> SearchResult:
    """The single index's answer from every shard's answer (shard order = position; each asked
    for `depth` hits). Timings: the slowest shard's stages; candidates: the merged depth."""
    n = len(results)
    hits = [globalize_hit(h, s, n) for s, r in enumerate(results) for h in r.hits]
    hits.sort(key=lambda h: -h.global_score)
    pool = hits[:depth]  # the single index's candidate set (module doc)
    pool.sort(key=lambda h: (-h.score, -h.global_score))
    slowest = max((r.timings for r in results), key=lambda t: t.get("total", 0.0), default={})
    used = min(depth, sum(int(r.candidates) for r in results))
    return SearchResult(pool[:k], dict(slowest), used)


def merge_info(infos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary of N shards: counts and bytes summed, the rest (model, FAISS kind, dims)
    from shard 0, server paths dropped, and `shards`: N."""
    first = dict(infos[0]) if infos else {}
    for key in ("path", "images_root", "files", "segments", "build", "health"):
        first.pop(key, None)
    for key in SUMMED:
        values = [i.get(key) for i in infos]
        if all(isinstance(v, int) for v in values):
            first[key] = sum(values)
    first["shards"] = len(infos)
    return first
