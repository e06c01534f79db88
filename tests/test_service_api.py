"""HTTP edges of the service against the in-memory FakeSearcher (the contract, no model).

The real-index tests (test_service_real.py) cover the same routes over an index built by the
indexer; here we pin every client-error path, auth, CORS, limits, metrics and the hot swap.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.autodepth import AutoDepth
from fakes import FakeSearcher
from indexer.results import SearchError
from service.settings import ConfigFileError, ServiceSettings


def _jpeg(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def fake(tmp_path) -> FakeSearcher:
    return FakeSearcher(tmp_path / "a", n_images=8, tag="a")


def client_for(searcher, tmp_path, **kw) -> TestClient:
    settings = ServiceSettings(index_dir=tmp_path, **kw)
    return TestClient(create_app(settings, searcher=searcher))


@pytest.fixture()
def client(fake, tmp_path):
    with client_for(fake, tmp_path, admin_key="adm") as c:
        yield c


def assert_error(r, status: int, fragment: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and isinstance(body["message"], str) and body["message"]
    assert fragment.lower() in body["message"].lower(), body["message"]
    return body


# --- search: happy paths ---------------------------------------------------------------------------------
def test_text_search_ranks_with_scores_urls_and_timings(client, fake):
    r = client.post("/search/text", json={"query": "a red dog", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["hits"]) == 3 and body["mode"] == "rerank" and body["k"] == 3
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    top = body["hits"][0]
    assert top["kind"] == "image" and top["image_url"] == f"/images/{top['id']}"
    assert top["local_score"] is not None and top["metadata"]["tag"] == "a"
    assert body["candidates"] == 8  # default depth 100, capped by the 8 images the fake holds
    assert set(body["timings_ms"]) >= {"encode", "faiss", "rerank", "total", "request"}
    assert body["index"]["generation"] == 1 and body["grid"] == [4, 4]
    assert body["hits"][0]["alignment"] is None  # only with explain


def test_explain_returns_one_cell_per_query_word(client, fake):
    body = client.post("/search/text", json={"query": "red dog", "k": 8, "explain": True}).json()
    img0 = next(h for h in body["hits"] if h["id"] == 0)  # image 0: red at cell 0, dog at cell 1
    words = [(a["word"], a["cell"], a["row"], a["col"]) for a in img0["alignment"]]
    assert words == [("red", 0, 0, 0), ("dog", 1, 0, 1)]
    assert all(isinstance(a["score"], float) for a in img0["alignment"])


def test_global_mode_has_no_local_score(client):
    body = client.post("/search/text", json={"query": "blue cat", "k": 2, "mode": "global"}).json()
    assert body["mode"] == "global" and all(h["local_score"] is None for h in body["hits"])


def test_filters_restrict_results(client):
    body = client.post("/search/text", json={"query": "dog", "k": 8, "filters": {"split": "train"}}).json()
    assert body["hits"] and all(h["metadata"]["split"] == "train" for h in body["hits"])
    body = client.post("/search/text", json={"query": "dog", "k": 8, "filters": {"n": [1, 2]}}).json()
    assert sorted(h["id"] for h in body["hits"]) == [1, 2]


def test_image_search_multipart_and_base64(client):
    data = _jpeg()
    r = client.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")}, data={"k": "4"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 4 and all(h["kind"] == "caption" and h["caption"] for h in hits)
    assert all(h["image_url"] == f"/images/{h['image_id']}" for h in hits)
    r2 = client.post("/search/image", json={"image_b64": base64.b64encode(data).decode(), "k": 4})
    assert [h["id"] for h in r2.json()["hits"]] == [h["id"] for h in hits]  # same image, same answer
    r3 = client.post("/search/image", json={"image_b64": "data:image/jpeg;base64," + base64.b64encode(data).decode(),
                                            "target": "images", "k": 3})
    assert r3.status_code == 200 and all(h["kind"] == "image" for h in r3.json()["hits"])


def test_items_and_images(client, fake):
    item = client.get("/items/2").json()
    assert item["kind"] == "image" and item["image_url"] == "/images/2"
    assert item["path"] == "images/a2.jpg"  # relative to the collection: the server's own path stays private
    cap = client.get("/items/10001").json()
    assert cap["kind"] == "caption" and cap["image_id"] == 0 and cap["image_url"] == "/images/0"
    r = client.get("/images/2")
    assert r.status_code == 200 and r.content == fake.paths[2].read_bytes()
    assert r.headers["content-type"] == "image/jpeg"


# --- hard edges ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, fragment", [
    ({"query": ""}, "query"),
    ({"query": "   \t"}, "empty"),
    ({"query": "x" * 3000}, "query"),
    ({"query": "dog", "k": 0}, "k"),
    ({"query": "dog", "k": 101}, "k"),
    ({"query": "dog", "candidates": 0}, "candidates"),
    ({"query": "dog", "candidates": 10**6}, "candidates"),
    ({"query": "dog", "candidates": "lots"}, "candidates"),
    ({"query": "dog", "mode": "fast"}, "mode"),
    ({"query": "dog", "filters": {"colour": "red"}}, "unknown filter field"),
    ({"query": "dog", "filters": {"split": {"$ne": 1}}}, "filters"),
    ({"query": "dog", "surprise": 1}, "surprise"),
    ({"k": 3}, "query"),
    ([1, 2], "body"),
])
def test_bad_text_requests_are_422_with_a_message(client, body, fragment):
    assert_error(client.post("/search/text", json=body), 422, fragment)


def test_settings_tighten_the_schema_bounds(fake, tmp_path):
    with client_for(fake, tmp_path, max_query_chars=10, max_candidates=50, max_k=5, default_candidates=20) as c:
        assert_error(c.post("/search/text", json={"query": "a" * 11}), 422, "too long")
        assert_error(c.post("/search/text", json={"query": "dog", "candidates": 51}), 422, "50")
        assert_error(c.post("/search/text", json={"query": "dog", "k": 6}), 422, "between 1 and 5")
        assert c.post("/search/text", json={"query": "dog", "k": 5, "candidates": 50}).status_code == 200


def test_malformed_json_is_400(client):
    assert_error(client.post("/search/text", content=b'{"query": ', headers={"content-type": "application/json"}),
                 400, "JSON")
    assert_error(client.post("/search/image", content=b"{nope", headers={"content-type": "application/json"}),
                 400, "JSON")


def test_body_size_limit_413(fake, tmp_path):
    with client_for(fake, tmp_path, max_request_bytes=4096) as c:
        big = b"x" * 5000
        assert_error(c.post("/search/image", files={"file": ("q.jpg", big, "image/jpeg")}), 413, "too large")
        # no Content-Length (chunked stream): the limit is enforced while reading
        def chunks():
            for _ in range(10):
                yield b"y" * 1000
        r = c.post("/search/image", content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413, "limit")
        assert c.post("/search/text", json={"query": "dog"}).status_code == 200  # small bodies still pass


@pytest.mark.parametrize("files, status, fragment", [
    ({"file": ("q.jpg", b"", "image/jpeg")}, 400, "empty"),
    ({"file": ("q.jpg", b"\xff\xd8\xff\xe0 not really a jpeg", "image/jpeg")}, 400, "image"),
    ({"file": ("q.txt", b"hello world", "text/plain")}, 415, "text/plain"),
    ({"other": ("q.jpg", b"abc", "image/jpeg")}, 400, "file"),
])
def test_bad_uploads(client, files, status, fragment):
    assert_error(client.post("/search/image", files=files), status, fragment)


def test_truncated_image_is_400(client):
    data = _jpeg((200, 200))
    assert_error(client.post("/search/image", files={"file": ("q.jpg", data[: len(data) // 2], "image/jpeg")}),
                 400, "image")


def test_bad_image_json_and_content_types(client):
    assert_error(client.post("/search/image", json={"image_b64": "%%% not base64"}), 400, "base64")
    assert_error(client.post("/search/image", json={"k": 3}), 422, "image_b64")
    assert_error(client.post("/search/image", content=b"raw", headers={"content-type": "text/plain"}), 415, "content")
    assert_error(client.post("/search/image", content=b"raw"), 415, "content")
    assert_error(client.post("/search/image", files={"file": ("q.jpg", _jpeg(), "image/jpeg")},
                             data={"k": "many"}), 422, "k")
    assert_error(client.post("/search/image", files={"file": ("q.jpg", _jpeg(), "image/jpeg")},
                             data={"filters": "{broken"}), 422, "filters")
    assert_error(client.post("/search/image", files={"file": ("q.jpg", _jpeg(), "image/jpeg")},
                             data={"filters": '{"nope": 1}'}), 422, "unknown filter")


@pytest.mark.parametrize("path, status", [
    ("/items/999999", 404), ("/items/-1", 422), ("/items/abc", 422), ("/items/99999999999999999999999", 422),
    ("/images/999", 404), ("/images/-3", 422), ("/images/..%2F..%2Fetc%2Fpasswd", 404), ("/images/1%00", 422),
    ("/images/../../etc/passwd", 404), ("/nope", 404),
])
def test_item_and_image_errors(client, path, status):
    assert_error(client.get(path), status)


def test_method_not_allowed_is_json(client):
    assert_error(client.get("/search/text"), 405, "not allowed")


def test_api_key(fake, tmp_path):
    with client_for(fake, tmp_path, api_key="s3cret") as c:
        assert_error(c.post("/search/text", json={"query": "dog"}), 401, "API key")
        assert_error(c.post("/search/text", json={"query": "dog"}, headers={"X-API-Key": "wrong"}), 401)
        assert c.post("/search/text", json={"query": "dog"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/images/1", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert_error(c.get("/images/1?api_key=s3cret"), 401)  # never in the URL: URLs end up in logs
        assert_error(c.get("/items/1"), 401)
        # operations and the page stay open for probes and browsers
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200
        assert_error(c.post("/admin/reload", json={}), 401)  # admin key defaults to the API key


def test_cors(fake, tmp_path):
    with client_for(fake, tmp_path, cors_origins=["http://app.example"]) as c:
        r = c.options("/search/text", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = c.post("/search/text", json={"query": "dog"}, headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = c.post("/search/text", json={"query": "dog"}, headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with client_for(fake, tmp_path) as c:  # off by default
        r = c.post("/search/text", json={"query": "dog"}, headers={"Origin": "http://app.example"})
        assert "access-control-allow-origin" not in r.headers


def test_searcher_search_error_is_422_not_500(fake, tmp_path):
    def boom(*a, **k):  # the contract's word for a request the index cannot answer
        raise SearchError("filter value not comparable")

    fake.search_text = boom
    with client_for(fake, tmp_path) as c:
        assert_error(c.post("/search/text", json={"query": "dog"}), 422, "not comparable")


def test_internal_errors_are_json_500_without_internals(fake, tmp_path):
    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    fake.search_text = boom
    with TestClient(create_app(ServiceSettings(index_dir=tmp_path), searcher=fake), raise_server_exceptions=False) as c:
        body = assert_error(c.post("/search/text", json={"query": "dog"}), 500, "internal")
        assert "secret" not in json.dumps(body)


# --- operations ---------------------------------------------------------------------------------------
def test_health_ready_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["info"]["images"] == 8
    client.post("/search/text", json={"query": "dog"})
    client.post("/search/text", json={"query": ""})
    text = client.get("/metrics").text
    assert 'service_requests_total{method="POST",route="/search/text",status="200"}' in text
    assert 'service_errors_total{route="/search/text",status="422"}' in text
    for stage in ("encode", "faiss", "rerank"):
        assert f'service_stage_seconds_count{{endpoint="text",stage="{stage}"}} 1.0' in text
    assert "service_request_seconds_bucket" in text and "service_index_generation 1.0" in text


def test_readyz_503_while_loading_then_ready(tmp_path):
    gate = threading.Event()

    def slow_loader(path: Path):
        gate.wait(10)
        return FakeSearcher(tmp_path / "slow", n_images=3)

    app = create_app(ServiceSettings(index_dir=tmp_path), loader=slow_loader)
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False and "loading" in r.json()["message"]
        assert_error(c.post("/search/text", json={"query": "dog"}), 503, "loading")
        assert c.get("/healthz").status_code == 200
        gate.set()
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.02)
        assert c.get("/readyz").json()["ready"] is True
        assert c.post("/search/text", json={"query": "dog"}).status_code == 200


def test_failed_initial_load_is_reported(tmp_path):
    def bad_loader(path: Path):
        raise RuntimeError("manifest.json is missing")

    with TestClient(create_app(ServiceSettings(index_dir=tmp_path), loader=bad_loader)) as c:
        for _ in range(200):
            body = c.get("/readyz").json()
            if "missing" in body["message"]:
                break
            time.sleep(0.02)
        assert body["ready"] is False and "manifest.json is missing" in body["message"]


# --- candidates: auto ---------------------------------------------------------------------------------
def test_auto_depth_converges_to_the_budget():
    auto = AutoDepth(budget_s=0.020, min_k=10, max_k=1000)
    assert auto.pick(10) == 100  # no measurement yet: the default depth
    a, b = 0.002, 0.0001  # true cost 2 ms + 0.1 ms per candidate -> 180 fit in 20 ms
    k = 100
    for _ in range(60):
        auto.observe(k, a + b * k)
        k = auto.pick(10)
    assert abs(k - 180) <= 2
    assert auto.pick(500) == 500  # never below k
    slow = AutoDepth(budget_s=0.001, min_k=10, max_k=1000, initial_cost_s=1.0)
    assert slow.pick(5) == 10  # floor


def test_auto_candidates_reported(fake, tmp_path):
    with client_for(fake, tmp_path, rerank_budget_ms=5.0) as c:
        body = c.post("/search/text", json={"query": "dog", "k": 2, "candidates": "auto"}).json()
        assert body["candidates_auto"] is True and 2 <= body["candidates"] <= 8
        # the fake's rerank_cost() says 20 us/candidate, so 5 ms fits 250 -> all 8 images
        assert c.app.state.engine.auto.pick(2) >= 8


# --- hot swap -----------------------------------------------------------------------------------------
def test_hot_swap_is_atomic_under_load(tmp_path):
    a = FakeSearcher(tmp_path / "a", n_images=8, tag="a", delay_s=0.003)
    (tmp_path / "b").mkdir()
    b_dir = tmp_path / "b"

    def loader(path: Path):
        return FakeSearcher(path / "data", n_images=5, tag=path.name, delay_s=0.003)

    app = create_app(ServiceSettings(index_dir=tmp_path / "a", admin_key="adm"), searcher=a, loader=loader)
    results: list = []
    stop = threading.Event()
    with TestClient(app) as c:
        def hammer():
            while not stop.is_set():
                results.append(c.post("/search/text", json={"query": "red dog", "k": 5}))

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(hammer)
            time.sleep(0.1)
            r = c.post("/admin/reload", json={"index_dir": str(b_dir)}, headers={"X-API-Key": "adm"})
            assert r.status_code == 200, r.text
            assert r.json()["index"]["generation"] == 2
            time.sleep(0.1)
            stop.set()
        gens = set()
        for r in results:
            assert r.status_code == 200, r.text  # no failed request during the swap
            body = r.json()
            gen = body["index"]["generation"]
            gens.add(gen)
            tags = {h["metadata"]["tag"] for h in body["hits"]}
            assert tags == {"a" if gen == 1 else "b"}  # no request mixed two indexes
        assert gens == {1, 2}
        # a bad new index leaves the old one serving
        bad = c.post("/admin/reload", json={"index_dir": str(tmp_path / "missing")}, headers={"X-API-Key": "adm"})
        assert_error(bad, 400, "cannot load index")
        assert c.get("/readyz").json()["index"]["generation"] == 2
        assert_error(c.post("/admin/reload", json={}, headers={"X-API-Key": "nope"}), 401)


def test_admin_without_key_is_loopback_only(fake, tmp_path):
    with client_for(fake, tmp_path) as c:  # TestClient's peer is "testclient", not loopback
        assert_error(c.post("/admin/reload", json={}), 403, "loopback")
    with client_for(fake, tmp_path, allow_admin=False) as c:
        assert_error(c.post("/admin/reload", json={}), 404)


# --- settings -----------------------------------------------------------------------------------------
def test_settings_from_file_and_env(tmp_path, monkeypatch):
    toml = tmp_path / "svc.toml"
    toml.write_text('port = 9123\nmax_k = 50\ncors_origins = ["http://a"]\n')
    s = ServiceSettings(config_file=toml)
    assert s.port == 9123 and s.max_k == 50 and s.cors_origins == ["http://a"]
    monkeypatch.setenv("SERVICE_PORT", "9200")
    monkeypatch.setenv("SERVICE_CORS_ORIGINS", "http://x, http://y")
    s = ServiceSettings(config_file=toml)
    assert s.port == 9200 and s.max_k == 50 and s.cors_origins == ["http://x", "http://y"]  # env beats file
    assert ServiceSettings(config_file=toml, port=1).port == 1  # explicit beats env
    js = tmp_path / "svc.json"
    js.write_text(json.dumps({"api_key": "k", "rerank_budget_ms": 7.5}))
    monkeypatch.setenv("SERVICE_CONFIG_FILE", str(js))
    s = ServiceSettings()
    assert s.api_key.get_secret_value() == "k" and s.rerank_budget_ms == 7.5
    with pytest.raises(ConfigFileError):
        ServiceSettings(config_file=tmp_path / "none.toml")


def test_openapi_documents_both_image_bodies(client):
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/search/image"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert "422" in spec["paths"]["/search/text"]["post"]["responses"]


def test_web_page_served(client):
    r = client.get("/")
    assert r.status_code == 200 and 'id="query"' in r.text and 'id="drop"' in r.text
    assert client.get("/static/app.js").status_code == 200
