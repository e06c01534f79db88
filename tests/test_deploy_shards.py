"""Sharded serving: 2 shard services behind the router answer exactly like one service over the
whole index (same hits, same order, same scores), including at a re-rank depth smaller than
the collection, where a naive "merge each shard's top-k" would differ."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.build import build
from indexer.config import BuildConfig
from indexer.searcher import Searcher
from service.app import create_app
from service.router import RouterSettings, create_router_app
from service.settings import ServiceSettings


def _write_pairs(col: Path, lines: list[str], name: str) -> Path:
    path = col / name
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, tiny_checkpoint):
    """One whole index and two shard indexes (even / odd images) of a 12-image collection."""
    tmp = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(1)
    col = tmp / "col"
    (col / "images").mkdir(parents=True)
    words = ["red", "blue", "green", "dog", "cat", "ball", "beach", "snow", "man", "child", "runs", "sits"]
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)).save(col / "images" / f"img{i}.jpg")
        caps = [" ".join(rng.choice(words, size=5)) for _ in range(2)]
        lines.append(json.dumps({"image": f"images/img{i}.jpg", "captions": caps, "split": "test", "n": i}) + "\n")
    _write_pairs(col, lines, "pairs.jsonl")
    lines = (col / "pairs.jsonl").read_text().splitlines(keepends=True)
    parts = {"whole": "pairs.jsonl",
             "shard0": _write_pairs(col, lines[0::2], "shard0.jsonl").name,
             "shard1": _write_pairs(col, lines[1::2], "shard1.jsonl").name}
    out = {}
    for name, pairs in parts.items():
        cfg = BuildConfig(images=str(col), captions=str(col / pairs), out=str(tmp / name),
                          checkpoint=str(tiny_checkpoint), faiss="flat", split="test", workers=0,
                          progress=False)  # split: only the images the pairs file names
        build(cfg)
        out[name] = tmp / name
    out["queries"] = [json.loads(l)["captions"][0] for l in lines]
    out["images"] = [col / "images" / f"img{i}.jpg" for i in range(len(lines))]
    return out


def _app(index: Path):
    return create_app(ServiceSettings(index_dir=index, background_load=False), searcher=Searcher(index))


class _Dead(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request):
        raise httpx.ConnectError("connection refused", request=request)


@pytest.fixture(scope="module")
def clients(indexes):
    whole = TestClient(_app(indexes["whole"]))
    mounts = {"http://shard0": httpx.ASGITransport(app=_app(indexes["shard0"])),
              "http://shard1": httpx.ASGITransport(app=_app(indexes["shard1"])),
              "http://dead": _Dead()}
    client = httpx.AsyncClient(mounts=mounts)
    # shard 0 has a dead replica first in line: failover must hide it
    settings = RouterSettings(shards=[["http://dead", "http://shard0"], ["http://shard1"]])
    routed = TestClient(create_router_app(settings, client))
    return whole, routed


def _key(hit: dict) -> tuple:
    return (hit["kind"], hit["metadata"].get("n"), hit.get("caption"))


@pytest.mark.parametrize("k,candidates", [(5, 12), (3, 4), (2, 2)])
def test_text_search_through_router_equals_single_index(clients, indexes, k, candidates):
    whole, routed = clients
    for q in indexes["queries"]:
        body = {"query": q, "k": k, "candidates": candidates}
        a, b = whole.post("/search/text", json=body), routed.post("/search/text", json=body)
        assert a.status_code == b.status_code == 200, b.text
        ha, hb = a.json()["hits"], b.json()["hits"]
        assert [_key(h) for h in ha] == [_key(h) for h in hb], q
        np.testing.assert_allclose([h["score"] for h in ha], [h["score"] for h in hb], rtol=1e-5, atol=1e-5)
        assert b.json()["exact"] is True


def test_image_search_for_captions_through_router_equals_single_index(clients, indexes):
    whole, routed = clients
    for path in indexes["images"][:4]:
        b64 = base64.b64encode(path.read_bytes()).decode()
        body = {"image_b64": b64, "k": 4, "candidates": 6, "target": "captions"}
        a, b = whole.post("/search/image", json=body), routed.post("/search/image", json=body)
        assert a.status_code == b.status_code == 200, b.text
        assert [h["caption"] for h in a.json()["hits"]] == [h["caption"] for h in b.json()["hits"]]
    # multipart is re-sent to the shards as JSON
    buf = io.BytesIO(indexes["images"][0].read_bytes())
    r = routed.post("/search/image", files={"file": ("x.jpg", buf, "image/jpeg")}, data={"k": "2"})
    assert r.status_code == 200 and len(r.json()["hits"]) == 2


def test_router_ids_reach_the_owning_shard(clients, indexes):
    _, routed = clients
    hits = routed.post("/search/text", json={"query": indexes["queries"][3], "k": 6}).json()["hits"]
    assert {h["id"] % 2 for h in hits} == {0, 1}, "hits from both shards"
    for h in hits:
        item = routed.get(f"/items/{h['id']}")
        assert item.status_code == 200 and item.json()["metadata"]["n"] == h["metadata"]["n"]
        img = routed.get(h["image_url"])
        assert img.status_code == 200 and img.headers["content-type"].startswith("image/")
    assert routed.get("/items/999999").status_code == 404


def test_router_forwards_client_errors_and_reports_readiness(clients):
    _, routed = clients
    r = routed.post("/search/text", json={"query": "   ", "k": 3})
    assert r.status_code == 422 and "query" in r.json()["message"]
    assert routed.post("/search/text", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
    assert routed.get("/readyz").json()["ready"] is True


def test_router_without_a_live_replica_is_not_ready(indexes):
    client = httpx.AsyncClient(mounts={"http://dead": _Dead(),
                                       "http://shard1": httpx.ASGITransport(app=_app(indexes["shard1"]))})
    routed = TestClient(create_router_app(RouterSettings(shards="http://dead;http://shard1"), client))
    r = routed.get("/readyz")
    assert r.status_code == 503 and "[0]" in r.json()["message"]
    r = routed.post("/search/text", json={"query": "red dog", "k": 2})
    assert r.status_code == 503 and "shard 0 unavailable" in r.json()["message"]


def test_naive_top_k_merge_would_differ(indexes):
    """Guards the equality test above: merging each shard's own top-k by fused score (without the
    global top-K cut) gives a different answer for some query at a shallow re-rank depth."""
    whole = TestClient(_app(indexes["whole"]))
    shards = [TestClient(_app(indexes[f"shard{s}"])) for s in (0, 1)]
    differs = 0
    for q in indexes["queries"]:
        body = {"query": q, "k": 2, "candidates": 2}
        naive = sorted((h for c in shards for h in c.post("/search/text", json=body).json()["hits"]),
                       key=lambda h: -h["score"])[:2]
        exact = whole.post("/search/text", json=body).json()["hits"]
        differs += [h["metadata"]["n"] for h in naive] != [h["metadata"]["n"] for h in exact]
    assert differs > 0
