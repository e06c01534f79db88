"""A `SearchBackend` over N index shards: encode the query once, fan it out, merge exactly.

`ShardedBackend` is what the Ray Serve ingress (`service.ray_serve`) hands to the ordinary
`service.app.create_app`, so the sharded deployment serves the single-box API, errors and web
page by construction. It talks to its shards through clients with one method,
`submit(method, *args) -> pending` (`pending.result()` gives the answer): `RayShard` in
`service.ray_serve` over a Serve deployment handle, `LocalShard` here over an in-process
`ShardServer` (tests, and a sharded index on one box). Nothing in this module imports Ray.

Where the work happens. The text (or image) query is encoded once, in the ingress: the
embedding is the same for every shard, so shards never encode (N encodes would cost N times
the CPU). Each shard searches its own slice from that embedding (`Searcher.search_embeddings`)
and returns its hits with their metadata; the merge is `service.shard_merge`. Image files
(`/images/{id}`) are served by the ingress from the path the owning shard gives: shards and
ingress mount the same collection (as they mount the same index storage).
"""
from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from encoder.pipeline import Encoder
from indexer.results import Hit, SearchError, SearchResult
from indexer.searcher import Searcher, encode_text_query

from .batching import CoalescingEncoder
from .engine import NotReady
from .integrity import FAILED, UNCHECKED, Verification
from .shard_merge import global_id, globalize_hit, globalize_item, merge, merge_info, split_id


class ShardUnavailable(NotReady):
    """No replica of a shard answered (HTTP 503 with Retry-After: a retry is answered once the
    cluster has replaced it)."""


class ShardServer:
    """What one shard replica runs: a `Searcher` over its slice, tagged with the index version
    it serves (so an ingress can check that one request never mixes versions)."""

    def __init__(self, index_dir: str | Path, version: str, searcher: Searcher | None = None,
                 verify: str | None = None):
        self.verification = Verification(UNCHECKED)
        if searcher is None:  # checked as the single box checks (`service.integrity`, SERVICE_VERIFY)
            folder = Path(index_dir).resolve()
            self.verification = Verification.before_load(folder, verify or os.environ.get("SERVICE_VERIFY",
                                                                                          "background"))
            searcher = Searcher(folder)
            self.verification.start(f"shard index {version}")
        self.searcher = searcher
        self.version = version

    def describe(self) -> dict[str, Any]:
        s = self.searcher
        model = s.info.get("model", {})
        return {"version": self.version, "info": s.info, "metadata_fields": sorted(s.metadata_fields),
                "checkpoint": s.manifest.checkpoint,
                "checkpoint_digest": model.get("checkpoint_digest"), "rerank_cost": s.rerank_cost(),
                "verified": self.verification.state}

    def search(self, query: Any, query_kind: str, target: str, k: int, candidates: int, mode: str,
               filters: dict | None, explain: bool, words: list[str] | None,
               hydrate: int | None = None) -> tuple[str, SearchResult]:
        if self.verification.state == FAILED:  # a token segment failed its background check: not served
            raise ShardUnavailable(f"shard index {self.version} failed verification: "
                                   f"{'; '.join(self.verification.problems)}")
        return self.version, self.searcher.search_embeddings(query, query_kind, target, k, candidates, mode,
                                                             filters, explain, words, hydrate=hydrate)

    def fill(self, hits: list[Hit]) -> list[Hit]:
        return self.searcher.fill(hits)

    def item(self, id: int) -> dict | None:
        return self.searcher.item(id)

    def item_by_path(self, path: str) -> dict | None:
        return self.searcher.item_by_path(path)

    def item_by_user_id(self, user_id: str | int) -> dict | None:
        return self.searcher.item_by_user_id(user_id)

    def image_path(self, id: int) -> str | None:
        p = self.searcher.image_path(id)
        return None if p is None else str(p)


class LocalShard:
    """A shard client over an in-process `ShardServer` (calls run on a small thread pool, so the
    fan-out is concurrent as it is over Ray)."""

    def __init__(self, server: ShardServer, threads: int = 4):
        self.server = server
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="shard")

    def submit(self, method: str, *args: Any) -> Future:
        return self.pool.submit(getattr(self.server, method), *args)


class ShardedBackend:
    """`service.contract.SearchBackend` over N shards that all serve index version `version`."""

    def __init__(self, shards: Sequence[Any], encoder: Encoder | CoalescingEncoder, version: str,
                 described: list[dict] | None = None):
        if not shards:
            raise ValueError("a sharded backend needs at least one shard")
        self.shards = list(shards)
        self.n = len(self.shards)
        self.encoder = encoder
        self.version = version
        described = described if described is not None else self.describe_all()
        check_shards(described, version)
        self.info = merge_info([d["info"] for d in described])
        self.metadata_fields: set[str] = set.intersection(*(set(d["metadata_fields"]) for d in described))
        self._cost = sum(float(d["rerank_cost"]) for d in described) / self.n  # shards re-rank in parallel
        grid = encoder.image_backbone.grid
        self.grid = (int(grid[0]), int(grid[1]))

    def describe_all(self) -> list[dict]:
        return self._all("describe")

    # --- search ----------------------------------------------------------------------------------
    def search_text(self, query: str, k: int = 10, candidates: int = 100, mode: str = "rerank",
                    filters: dict | None = None, explain: bool = False) -> SearchResult:
        t0 = time.perf_counter()
        emb, words, _ = encode_text_query(self.encoder, query, explain)
        return self._fan(t0, emb, "text", "images", k, candidates, mode, filters, explain, words)

    def search_image(self, image: Any, k: int = 10, candidates: int = 100, mode: str = "rerank",
                     filters: dict | None = None, target: str = "captions", explain: bool = False) -> SearchResult:
        t0 = time.perf_counter()
        emb = self.encoder.encode_images([image])
        return self._fan(t0, emb, "image", target, k, candidates, mode, filters, explain, None)

    def _fan(self, t0: float, emb: Any, query_kind: str, target: str, k: int, candidates: int, mode: str,
             filters: dict | None, explain: bool, words: list[str] | None) -> SearchResult:
        encode_s = time.perf_counter() - t0
        depth = max(k, candidates) if mode == "rerank" else k  # every shard returns its whole top-depth
        # ... with item fields on its first k only (the rest: ids and scores); a merged top-k
        # hit beyond its shard's first k (rare: the pool's global cut dropped better-fused
        # hits of that shard) is filled by its shard afterwards
        t_fan = time.perf_counter()
        answers = self._all("search", emb, query_kind, target, depth, depth, mode, filters, explain, words, k)
        fanout = time.perf_counter() - t_fan
        versions = {v for v, _ in answers}
        if versions != {self.version}:  # cannot happen: each backend holds one version's shards
            raise ShardUnavailable(f"shards answered from index versions {sorted(versions)}, expected "
                                   f"{self.version}")
        results = [r for _, r in answers]
        result = merge(results, k, depth)
        filled = {global_id(s, h.id, self.n) for s, r in enumerate(results)
                  for h in (r.hits if explain else r.hits[:k])}  # (explained hits all come filled)
        self._fill([(j, h) for j, h in enumerate(result.hits) if h.id not in filled], result.hits)
        result.timings.update(encode=encode_s, fanout=fanout, total=time.perf_counter() - t0)
        return result

    def _fill(self, missing: list[tuple[int, Hit]], hits: list[Hit]) -> None:
        """Fill the item fields of merged hits `missing` ((position, hit)) from their shards."""
        by_shard: dict[int, list[tuple[int, Hit]]] = {}
        for j, h in missing:
            by_shard.setdefault(split_id(h.id, self.n)[0], []).append((j, h))
        pending = {s: self.shards[s].submit("fill", [dataclasses.replace(h, id=split_id(h.id, self.n)[1],
                                                                          image_id=None) for _, h in got])
                   for s, got in by_shard.items()}
        for s, p in pending.items():
            for (j, _), h in zip(by_shard[s], p.result()):
                hits[j] = globalize_hit(h, s, self.n)

    # --- items -------------------------------------------------------------------------------------
    def item(self, id: int) -> dict | None:
        shard, local = split_id(id, self.n)
        return globalize_item(self.shards[shard].submit("item", local).result(), shard, self.n)

    def _find(self, method: str, key: Any) -> dict | None:
        """Asked of every shard; the first (by shard) that holds the image answers."""
        for shard, item in enumerate(self._all(method, key)):
            if item is not None:
                return globalize_item(item, shard, self.n)
        return None

    def item_by_path(self, path: str) -> dict | None:
        return self._find("item_by_path", path)

    def item_by_user_id(self, user_id: str | int) -> dict | None:
        return self._find("item_by_user_id", user_id)

    def image_path(self, id: int) -> Path | None:
        shard, local = split_id(id, self.n)
        p = self.shards[shard].submit("image_path", local).result()
        return None if p is None else Path(p)

    def rerank_cost(self) -> float:
        return self._cost

    def _all(self, method: str, *args: Any) -> list[Any]:
        pending = [s.submit(method, *args) for s in self.shards]  # all in flight before the first wait
        return [p.result() for p in pending]


def check_shards(described: list[dict], version: str) -> None:
    """Every shard must serve `version` and be built by the same model."""
    wrong = [s for s, d in enumerate(described) if d["version"] != version]
    if wrong:
        raise ShardUnavailable(f"shards {wrong} do not serve index version {version}")
    digests = {d.get("checkpoint_digest") for d in described}
    if len(digests) > 1:
        raise SearchError(f"the shards were built by different models ({len(digests)} checkpoints): rebuild them "
                          "with one")


def ingress_encoder(checkpoint: str | None, settings: Any) -> Any:
    """The query encoder of the shards' model, set up as the single-box service sets up its own
    (text runtime, coalesced encodes): see `service.engine.default_loader`."""
    encoder = Encoder.from_pretrained(checkpoint or None, device=settings.device)
    encoder.set_text_runtime(settings.text_runtime, threads=settings.torch_threads)
    if settings.encode_batch > 1:
        encoder = CoalescingEncoder(encoder, settings.encode_batch)
    return encoder
