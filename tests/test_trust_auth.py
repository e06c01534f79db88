"""Issue 18, items 1-2: the API key never reaches a log line, and without the key (when one is set)
the service says only whether it is ready: no server paths, no metrics, no schema."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from fakes import FakeSearcher
from service.settings import ServiceSettings

KEY = "k3y-Zq81-never-log-me"
ROOT = Path(__file__).resolve().parents[1]
SERVE_FAKE = """
import sys
from pathlib import Path
import uvicorn
from service.app import create_app
from fakes import FakeSearcher
from service.settings import ServiceSettings
root = Path(sys.argv[1])
app = create_app(ServiceSettings(index_dir=root), searcher=FakeSearcher(root, n_images=4))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="debug")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_key_never_reaches_the_log(tmp_path):
    """A real uvicorn with its default logging (access log on, debug level): the key sent in a
    header, as a bearer token, and wrongly in the URL; none of its output may contain it."""
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}, "SERVICE_API_KEY": KEY,
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_FAKE, str(tmp_path / "idx"), str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/search/text", json={"query": "dog"}, headers={"X-API-Key": KEY}).status_code == 200
            assert c.get("/items/1", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
            # the key in the URL is refused (URLs are logged by servers and proxies) ...
            assert c.get(f"/images/1?api_key={KEY}").status_code == 401
            assert c.post(f"/search/text?api_key={KEY}&k=3", json={"query": "dog"}).status_code == 401
            assert c.get(f"/metrics?token={KEY}").status_code == 401
            assert c.get("/items/1", headers={"X-API-Key": KEY + "x"}).status_code == 401
            assert c.post("/admin/reload", json={"index_dir": str(tmp_path / "nope")},
                          headers={"X-API-Key": KEY}).status_code == 400
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    lines = out.splitlines()
    # ... and still never logged: the access log keeps the path, not the query string
    assert any('"GET /images/1?[redacted] HTTP/1.1" 401' in line for line in lines), out
    assert any('"POST /search/text HTTP/1.1" 200' in line for line in lines), out
    assert [line for line in lines if KEY in line] == []


@pytest.fixture()
def fake(tmp_path) -> FakeSearcher:
    return FakeSearcher(tmp_path / "idx", n_images=4)


def _client(fake, tmp_path, **kw) -> TestClient:
    return TestClient(create_app(ServiceSettings(index_dir=tmp_path / "idx", **kw), searcher=fake))


def test_without_the_key_readiness_says_only_ready(fake, tmp_path):
    with _client(fake, tmp_path, api_key=KEY) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"ready": True, "message": "ready", "verified": "unchecked"}
        assert str(tmp_path) not in r.text
        assert c.get("/healthz").json() == {"status": "ok"}
        for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
            body = c.get("/readyz", headers=headers).json()
            assert body["ready"] and body["info"]["images"] == 4 and body["index"]["generation"] == 1
        assert "info" not in c.get("/readyz", headers={"X-API-Key": "wrong"}).json()


def test_without_the_key_no_metrics_docs_or_schema(fake, tmp_path):
    with _client(fake, tmp_path, api_key=KEY) as c:
        assert c.get("/metrics").status_code == 401
        assert "service_requests_total" in c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert c.get("/openapi.json").status_code == 401
        schema = c.get("/openapi.json", headers={"X-API-Key": KEY}).json()
        assert "/search/text" in schema["paths"] and "/openapi.json" not in schema["paths"]
        assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
        assert c.get("/").status_code == 200  # the page itself asks for the key


def test_public_ops_opens_them_again(fake, tmp_path):
    with _client(fake, tmp_path, api_key=KEY, public_ops=True) as c:
        assert c.get("/metrics").status_code == 200 and c.get("/docs").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/readyz").json()["info"]["images"] == 4
        assert c.post("/search/text", json={"query": "dog"}).status_code == 401  # the API still needs the key


def test_no_key_everything_open(fake, tmp_path):
    with _client(fake, tmp_path) as c:
        assert c.get("/metrics").status_code == 200 and c.get("/openapi.json").status_code == 200
        assert c.get("/readyz").json()["info"]["images"] == 4


def test_not_ready_reason_stays_private_without_the_key(tmp_path):
    secret_dir = tmp_path / "srv" / "private-index"

    def bad_loader(path: Path):
        raise RuntimeError(f"cannot open {path}/meta.sqlite")

    app = create_app(ServiceSettings(index_dir=secret_dir, api_key=KEY), loader=bad_loader)
    secret_dir.mkdir(parents=True)
    with TestClient(app) as c:
        for _ in range(200):
            r = c.get("/readyz", headers={"X-API-Key": KEY})
            if "meta.sqlite" in r.json()["message"]:
                break
            time.sleep(0.02)
        assert r.status_code == 503 and "meta.sqlite" in r.json()["message"]  # the operator sees why
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False, "message": "no index loaded"}
        assert "private-index" not in r.text


def test_readiness_details_hold_no_server_paths(tiny_checkpoint, tiny_collection, tmp_path):
    """Over a real index: its summary has counts and model, not the images root, captions file,
    checkpoint folder or index path."""
    from indexer.build import build
    from indexer.config import BuildConfig
    from indexer.searcher import Searcher

    out = tmp_path / "index"
    build(BuildConfig(images=str(tiny_collection), captions=str(tiny_collection / "pairs.jsonl"), out=str(out),
                      checkpoint=str(tiny_checkpoint), progress=False, faiss="flat"))
    app = create_app(ServiceSettings(index_dir=out, api_key=KEY, background_load=False), searcher=Searcher(out))
    with TestClient(app) as c:
        body = c.get("/readyz", headers={"X-API-Key": KEY}).json()
    info = json.dumps(body["info"])
    assert body["info"]["images"] == 6 and body["info"]["model"]["checkpoint_digest"]
    for private in (str(tiny_collection), str(tiny_checkpoint), str(out), "images_root", "captions_file"):
        assert private not in info
