"""Sharded serving without Ray: `ShardedBackend` over two in-process shards answers exactly like
one service over the whole index (same hits, same order, same scores), including at a re-rank
depth smaller than the collection, where a naive "merge each shard's top-k" would differ; ids
reach the shard that owns them. The merge rule (`service.shard_merge`) is also checked on its
own. The same backend behind Ray Serve: tests/test_serve_ray.py."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.build import build
from indexer.config import BuildConfig
from indexer.results import Hit, SearchResult
from indexer.searcher import Searcher
from service.app import create_app
from service.ray_backend import LocalShard, ShardedBackend, ShardServer, ShardUnavailable
from service.settings import ServiceSettings
from service.shard_merge import global_id, globalize_item, merge, merge_info, split_id


def _write_pairs(col: Path, lines: list[str], name: str) -> Path:
    path = col / name
    path.write_text("".join(lines))
    return path


def build_shard_indexes(tmp: Path, checkpoint: Path, n_images: int = 12, seed: int = 1, versions: int = 1
                        ) -> dict:
    """One whole index and two shard indexes (even / odd images) of an `n_images` collection.
    `versions` > 1 also builds shard pairs `shard0_v2`... over the collection's first n-2 images
    (a second index version whose answers differ)."""
    rng = np.random.default_rng(seed)
    col = tmp / "col"
    (col / "images").mkdir(parents=True)
    words = ["red", "blue", "green", "dog", "cat", "ball", "beach", "snow", "man", "child", "runs", "sits"]
    lines = []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)).save(col / "images" / f"img{i}.jpg")
        caps = [" ".join(rng.choice(words, size=5)) for _ in range(2)]
        lines.append(json.dumps({"image": f"images/img{i}.jpg", "captions": caps, "split": "test", "n": i,
                                 "id": f"u{i}"}) + "\n")
    _write_pairs(col, lines, "pairs.jsonl")
    parts = {"whole": "pairs.jsonl",
             "shard0": _write_pairs(col, lines[0::2], "shard0.jsonl").name,
             "shard1": _write_pairs(col, lines[1::2], "shard1.jsonl").name}
    for v in range(2, versions + 1):
        sub = lines[: n_images - 2 * (v - 1)]
        parts[f"shard0_v{v}"] = _write_pairs(col, sub[0::2], f"shard0_v{v}.jsonl").name
        parts[f"shard1_v{v}"] = _write_pairs(col, sub[1::2], f"shard1_v{v}.jsonl").name
    out: dict = {}
    for name, pairs in parts.items():
        cfg = BuildConfig(images=str(col), captions=str(col / pairs), out=str(tmp / name),
                          checkpoint=str(checkpoint), faiss="flat", split="test", workers=0,
                          progress=False)  # split: only the images the pairs file names
        build(cfg)
        out[name] = tmp / name
    out["queries"] = [json.loads(line)["captions"][0] for line in lines]
    out["images"] = [col / "images" / f"img{i}.jpg" for i in range(len(lines))]
    return out


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, tiny_checkpoint):
    return build_shard_indexes(tmp_path_factory.mktemp("shards"), tiny_checkpoint)


def _app(searcher, index: Path | None = None):
    return create_app(ServiceSettings(index_dir=index, background_load=False), searcher=searcher)


def sharded(indexes, version: str = "v1", names=("shard0", "shard1")) -> ShardedBackend:
    whole = Searcher(indexes["whole"])
    shards = [LocalShard(ShardServer(indexes[n], version)) for n in names]
    return ShardedBackend(shards, whole.encoder, version)


@pytest.fixture(scope="module")
def clients(indexes):
    whole = TestClient(_app(Searcher(indexes["whole"]), indexes["whole"]))
    routed = TestClient(_app(sharded(indexes)))
    return whole, routed


def _key(hit: dict) -> tuple:
    return (hit["kind"], hit["metadata"].get("n"), hit.get("caption"), hit.get("path"), hit.get("user_id"))


@pytest.mark.parametrize("k,candidates", [(5, 12), (3, 4), (2, 2)])
def test_text_search_over_shards_equals_single_index(clients, indexes, k, candidates):
    whole, routed = clients
    for q in indexes["queries"]:
        body = {"query": q, "k": k, "candidates": candidates}
        a, b = whole.post("/search/text", json=body), routed.post("/search/text", json=body)
        assert a.status_code == b.status_code == 200, b.text
        ha, hb = a.json()["hits"], b.json()["hits"]
        assert [_key(h) for h in ha] == [_key(h) for h in hb], q
        np.testing.assert_allclose([h["score"] for h in ha], [h["score"] for h in hb], rtol=1e-5, atol=1e-5)
        assert b.json()["candidates"] == a.json()["candidates"]


def test_explain_and_global_mode_over_shards_equal_single_index(clients, indexes):
    whole, routed = clients
    for body in ({"query": indexes["queries"][2], "k": 3, "explain": True},
                 {"query": indexes["queries"][5], "k": 4, "mode": "global"}):
        a, b = whole.post("/search/text", json=body).json(), routed.post("/search/text", json=body).json()
        assert [_key(h) for h in a["hits"]] == [_key(h) for h in b["hits"]]
        assert [h["alignment"] for h in a["hits"]] == [h["alignment"] for h in b["hits"]]
        assert a["grid"] == b["grid"]


def test_image_search_over_shards_equals_single_index(clients, indexes):
    whole, routed = clients
    for path in indexes["images"][:4]:
        b64 = base64.b64encode(path.read_bytes()).decode()
        for target in ("captions", "images"):
            body = {"image_b64": b64, "k": 4, "candidates": 6, "target": target}
            a, b = whole.post("/search/image", json=body), routed.post("/search/image", json=body)
            assert a.status_code == b.status_code == 200, b.text
            assert [_key(h) for h in a.json()["hits"]] == [_key(h) for h in b.json()["hits"]]
    buf = io.BytesIO(indexes["images"][0].read_bytes())
    r = routed.post("/search/image", files={"file": ("x.jpg", buf, "image/jpeg")}, data={"k": "2"})
    assert r.status_code == 200 and len(r.json()["hits"]) == 2


def test_hits_beyond_a_shards_first_k_are_filled_by_their_shard(indexes):
    """Shards return item fields on their first k hits only; any other merged hit gets them
    from its own shard (served ids, and a caption's image id, as the single index gives)."""
    backend = sharded(indexes)
    image = Image.open(indexes["images"][1]).convert("RGB")
    for full in (backend.search_text(indexes["queries"][0], k=6, candidates=12),
                 backend.search_image(image, k=6, candidates=12, target="captions")):
        light = [dataclasses.replace(h, metadata={}, path=None, caption=None, image_id=None, user_id=None)
                 for h in full.hits]
        backend._fill(list(enumerate(light))[1::2], light)
        fields = lambda h: (h.id, h.metadata, h.path, h.caption, h.image_id, h.user_id)  # noqa: E731
        assert [fields(h) for h in light[1::2]] == [fields(h) for h in full.hits[1::2]]
        assert all(h.path is None for h in light[0::2])


def test_ids_reach_the_owning_shard(clients, indexes):
    _, routed = clients
    hits = routed.post("/search/text", json={"query": indexes["queries"][3], "k": 6}).json()["hits"]
    assert {h["id"] % 2 for h in hits} == {0, 1}, "hits from both shards"
    for h in hits:
        item = routed.get(f"/items/{h['id']}")
        assert item.status_code == 200 and item.json()["metadata"]["n"] == h["metadata"]["n"]
        assert item.json()["image_url"] == f"/images/{h['id']}"
        img = routed.get(h["image_url"])
        assert img.status_code == 200 and img.headers["content-type"].startswith("image/")
        assert img.content == indexes["images"][h["metadata"]["n"]].read_bytes()
        by_path = routed.get("/items", params={"path": h["path"]})
        assert by_path.status_code == 200 and by_path.json()["id"] == h["id"]
        by_user = routed.get("/items", params={"user_id": h["user_id"]})
        assert by_user.status_code == 200 and by_user.json()["id"] == h["id"]
    assert routed.get("/items/999999").status_code == 404
    assert routed.get("/images/999999").status_code == 404
    assert routed.get("/items", params={"path": "images/none.jpg"}).status_code == 404


def test_errors_and_readiness_are_the_single_box_ones(clients):
    whole, routed = clients
    for body in ({"query": "   ", "k": 3}, {"query": "red", "k": 0}, {"query": "red", "filters": {"nope": 1}}):
        a, b = whole.post("/search/text", json=body), routed.post("/search/text", json=body)
        assert a.status_code == b.status_code and a.status_code in (400, 422), b.text
        assert a.json()["message"] == b.json()["message"]
    assert routed.post("/search/text", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
    r = routed.get("/readyz").json()
    assert r["ready"] is True and r["info"]["images"] == 12  # summed over the shards
    assert "path" not in r["info"]
    assert routed.get("/").text == whole.get("/").text


def test_a_shard_without_a_replica_is_a_503(indexes):
    class Down:
        def __init__(self, inner):
            self.inner, self.down = inner, False

        def submit(self, method, *args):
            if self.down:
                raise ShardUnavailable("shard 0 unavailable (no replica answered)")
            return self.inner.submit(method, *args)

    backend = sharded(indexes)
    backend.shards[0] = Down(backend.shards[0])
    client = TestClient(_app(backend))
    assert client.post("/search/text", json={"query": "red dog", "k": 2}).status_code == 200
    backend.shards[0].down = True
    r = client.post("/search/text", json={"query": "red dog", "k": 2})
    assert r.status_code == 503 and "shard 0 unavailable" in r.json()["message"] and r.headers["retry-after"]


def test_shards_of_another_version_are_refused(indexes):
    shards = [LocalShard(ShardServer(indexes["shard0"], "v1")), LocalShard(ShardServer(indexes["shard1"], "v2"))]
    with pytest.raises(ShardUnavailable, match=r"shards \[1\] do not serve index version v1"):
        ShardedBackend(shards, Searcher(indexes["whole"]).encoder, "v1")


def test_naive_top_k_merge_would_differ(indexes):
    """Guards the equality test above: merging each shard's own top-k by fused score (without the
    global top-K cut) gives a different answer for some query at a shallow re-rank depth."""
    whole = TestClient(_app(Searcher(indexes["whole"])))
    shards = [TestClient(_app(Searcher(indexes[f"shard{s}"]))) for s in (0, 1)]
    differs = 0
    for q in indexes["queries"]:
        body = {"query": q, "k": 2, "candidates": 2}
        naive = sorted((h for c in shards for h in c.post("/search/text", json=body).json()["hits"]),
                       key=lambda h: -h["score"])[:2]
        exact = whole.post("/search/text", json=body).json()["hits"]
        differs += [h["metadata"]["n"] for h in naive] != [h["metadata"]["n"] for h in exact]
    assert differs > 0


# --- the merge rule on its own ------------------------------------------------------------------------
def _hit(id: int, score: float, g: float, kind: str = "image", image_id: int | None = None) -> Hit:
    return Hit(id=id, score=score, global_score=g, local_score=score - g, kind=kind, image_id=image_id)


def test_merge_takes_the_global_top_depth_then_the_fused_order():
    # shard 0's fused favourite (id 0) is outside the global top-3 of the union: the exact merge drops it
    s0 = SearchResult([_hit(0, 0.99, 0.10), _hit(1, 0.50, 0.90)], {"total": 0.01, "rerank": 0.004}, 2)
    s1 = SearchResult([_hit(0, 0.70, 0.80), _hit(1, 0.60, 0.70, "caption", image_id=3)],
                      {"total": 0.02, "rerank": 0.003}, 2)
    r = merge([s0, s1], k=2, depth=3)
    assert [(h.id, h.score) for h in r.hits] == [(1, 0.70), (3, 0.60)]  # global ids: local * 2 + shard
    assert r.hits[1].image_id == 7 and r.candidates == 3 and r.timings["rerank"] == 0.003  # the slowest shard's


def test_ids_and_items_round_trip():
    for n in (1, 2, 5):
        for shard in range(n):
            for local in (0, 1, 17):
                assert split_id(global_id(shard, local, n), n) == (shard, local)
    item = globalize_item({"id": 4, "kind": "caption", "image_id": 2, "caption": "x"}, 1, 3)
    assert item["id"] == 13 and item["image_id"] == 7 and globalize_item(None, 0, 2) is None


def test_merged_info_sums_counts_and_drops_server_paths():
    a = {"images": 3, "captions": 6, "bytes": 10, "dim": 8, "path": "/srv/a", "images_root": "/srv/img",
         "model": {"checkpoint_digest": "d"}}
    info = merge_info([a, {**a, "images": 2, "path": "/srv/b"}])
    assert info["images"] == 5 and info["captions"] == 12 and info["bytes"] == 20 and info["dim"] == 8
    assert info["shards"] == 2 and "path" not in info and "images_root" not in info


def test_a_shard_checks_its_index_like_the_single_box(indexes, tmp_path):
    """A damaged small file stops the replica before it serves (the file named); a damaged token
    segment, found by the background check, makes its searches 503 instead of answering."""
    import shutil

    from service.integrity import FAILED, VerifyError

    bad = tmp_path / "bad"
    shutil.copytree(indexes["shard0"], bad)
    with open(bad / "meta.sqlite", "ab") as f:
        f.write(b"x")
    with pytest.raises(VerifyError, match="meta.sqlite"):
        ShardServer(bad, "v1")
    seg = tmp_path / "seg"
    shutil.copytree(indexes["shard0"], seg)
    segment = next(seg.glob("tokens-*.h5"))
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))
    server = ShardServer(seg, "v1")
    assert server.verification.wait(30) and server.verification.state == FAILED
    backend = ShardedBackend([LocalShard(server), LocalShard(ShardServer(indexes["shard1"], "v1"))],
                             Searcher(indexes["whole"]).encoder, "v1")
    r = TestClient(_app(backend)).post("/search/text", json={"query": "red dog", "k": 2})
    assert r.status_code == 503 and "failed verification" in r.json()["message"] and "tokens-" in r.json()["message"]
