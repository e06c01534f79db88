"""The service over a real index: built by the indexer from the tiny checkpoint, served by the
real Searcher. Covers the engine end to end, the hot swap between two real indexes, SIGHUP
and the console script."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

pytest.importorskip("indexer.searcher", reason="indexer.searcher is not in this checkout")

from indexer.build import build  # noqa: E402
from indexer.config import BuildConfig  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402

WORDS = ["red", "blue", "green", "dog", "cat", "ball", "beach", "snow", "man", "child", "runs", "sits"]


def write_collection(root: Path, tag: str, n: int = 6, seed: int = 0) -> Path:
    """Same shape as conftest's tiny_collection (which is function-scoped), plus a `tag` field."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    with (root / "pairs.jsonl").open("w") as f:
        for i in range(n):
            arr = rng.integers(0, 255, size=(48 + 8 * i, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "images" / f"img{i}.jpg")
            caps = [" ".join(rng.choice(WORDS, size=5)) for _ in range(2)]
            split = "test" if i % 2 == 0 else "train"
            f.write(json.dumps({"image": f"images/img{i}.jpg", "captions": caps, "split": split, "n": i,
                                "tag": tag}) + "\n")
    return root


def build_index(tmp: Path, tag: str, checkpoint: Path, n: int = 6, seed: int = 0) -> Path:
    col = write_collection(tmp / f"col-{tag}", tag, n, seed)
    out = tmp / f"index-{tag}"
    build(BuildConfig(images=str(col), captions=str(col / "pairs.jsonl"), out=str(out), checkpoint=str(checkpoint),
                      progress=False, faiss="flat"))
    return out


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("svc-real")
    return {"a": build_index(tmp, "a", tiny_checkpoint, 6, 0), "b": build_index(tmp, "b", tiny_checkpoint, 4, 1)}


@pytest.fixture(scope="module")
def client(indexes):
    app = create_app(ServiceSettings(index_dir=indexes["a"], admin_key="adm", background_load=False))
    with TestClient(app) as c:
        yield c


def test_ready_with_real_index(client, indexes):
    body = client.get("/readyz").json()
    assert body["ready"] and body["info"]["images"] == 6 and body["info"]["captions"] == 12
    assert body["index"]["index_dir"] == str(indexes["a"])


def test_text_search_explain_grounds_every_word(client):
    body = client.post("/search/text", json={"query": "Red dog runs", "k": 3, "explain": True}).json()
    assert len(body["hits"]) == 3 and body["grid"] == [4, 4] and body["candidates"] == 6
    for h in body["hits"]:
        assert h["kind"] == "image" and h["local_score"] is not None and h["image_url"] == f"/images/{h['id']}"
        assert [a["word"] for a in h["alignment"]] == ["red", "dog", "runs"]  # tiny-text: lower-cased words
        for a in h["alignment"]:
            assert 0 <= a["cell"] < 16 and (a["row"], a["col"]) == divmod(a["cell"], 4)
    assert [h["score"] for h in body["hits"]] == sorted((h["score"] for h in body["hits"]), reverse=True)
    t = body["timings_ms"]
    assert t["encode"] > 0 and t["faiss"] > 0 and t["rerank"] > 0 and t["request"] >= t["total"] * 0.5


def test_global_and_rerank_agree_on_global_scores(client):
    g = client.post("/search/text", json={"query": "blue cat sits", "k": 6, "mode": "global"}).json()
    r = client.post("/search/text", json={"query": "blue cat sits", "k": 6, "mode": "rerank"}).json()
    gs = {h["id"]: h["global_score"] for h in g["hits"]}
    assert all(abs(gs[h["id"]] - h["global_score"]) < 1e-4 for h in r["hits"])
    assert all(h["local_score"] is None for h in g["hits"])


def test_filters_on_real_metadata(client):
    body = client.post("/search/text", json={"query": "dog", "k": 6, "filters": {"split": "train"}}).json()
    assert {h["metadata"]["split"] for h in body["hits"]} == {"train"} and len(body["hits"]) == 3
    r = client.post("/search/text", json={"query": "dog", "filters": {"colour": "red"}})
    assert r.status_code == 422 and "unknown filter" in r.json()["message"]


def test_image_search_captions_and_images(client, indexes):
    data = (indexes["a"].parent / "col-a" / "images" / "img2.jpg").read_bytes()
    r = client.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")}, data={"k": "5"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5 and all(h["kind"] == "caption" and h["caption"] for h in hits)
    assert all(h["image_url"] == f"/images/{h['image_id']}" for h in hits)
    r = client.post("/search/image", json={"image_b64": base64.b64encode(data).decode(), "target": "images", "k": 1})
    assert r.json()["hits"][0]["id"] == client.get("/items/2").json()["id"]  # the image finds itself first


def test_items_and_image_files(client, indexes):
    item = client.get("/items/2").json()
    assert item["kind"] == "image" and item["metadata"]["n"] == 2
    assert item["path"] == "images/img2.jpg"  # collection-relative: the server's own path stays private
    r = client.get("/images/2")
    assert r.status_code == 200 and r.content == (indexes["a"].parent / "col-a" / "images" / "img2.jpg").read_bytes()
    caption_id = client.post("/search/text", json={"query": "dog", "k": 1}).json()["hits"][0]["id"] + 1000
    assert client.get(f"/images/{caption_id}").status_code == 404
    assert client.get("/items/999999").status_code == 404


def test_auto_depth_on_real_index(client):
    body = client.post("/search/text", json={"query": "dog", "k": 2, "candidates": "auto"}).json()
    assert body["candidates_auto"] is True and 2 <= body["candidates"] <= 6
    assert client.app.state.engine.auto.per_candidate_s > 0  # measured by the searcher at load, then EWMA


def test_hot_swap_between_real_indexes(indexes, tiny_checkpoint):
    app = create_app(ServiceSettings(index_dir=indexes["a"], admin_key="adm", background_load=False))
    results, stop = [], threading.Event()
    with TestClient(app) as c:
        def hammer():
            while not stop.is_set():
                results.append(c.post("/search/text", json={"query": "red dog", "k": 6, "explain": True}))

        with ThreadPoolExecutor(3) as pool:
            for _ in range(3):
                pool.submit(hammer)
            time.sleep(0.3)
            r = c.post("/admin/reload", json={"index_dir": str(indexes["b"])}, headers={"X-API-Key": "adm"})
            assert r.status_code == 200, r.text
            time.sleep(0.3)
            stop.set()
        seen = set()
        for r in results:
            assert r.status_code == 200, r.text
            body = r.json()
            tags = {h["metadata"]["tag"] for h in body["hits"]}
            expect = "a" if body["index"]["generation"] == 1 else "b"
            assert tags == {expect} and len(body["hits"]) == (6 if expect == "a" else 4)
            seen.add(expect)
        assert seen == {"a", "b"}
        assert c.get("/readyz").json()["info"]["images"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> dict:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"service exited: {proc.stderr.read()}")
        try:
            r = httpx.get(url + "/readyz", timeout=10)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("service did not become ready")


def test_console_script_serves_and_sighup_swaps(indexes, tmp_path):
    import httpx

    link = tmp_path / "current"
    link.symlink_to(indexes["a"])
    port = _free_port()
    env = {**os.environ, "SERVICE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--index", str(link), "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        url = f"http://127.0.0.1:{port}"
        ready = _wait_ready(url, proc)
        assert ready["info"]["images"] == 6 and ready["index"]["generation"] == 1
        assert httpx.post(url + "/search/text", json={"query": "dog", "k": 2}, timeout=60).status_code == 200
        link.unlink()
        link.symlink_to(indexes["b"])  # a new version, then HUP
        proc.send_signal(signal.SIGHUP)
        for _ in range(600):
            body = httpx.get(url + "/readyz", timeout=60).json()
            if body["index"]["generation"] == 2:
                break
            time.sleep(0.1)
        assert body["index"]["generation"] == 2 and body["info"]["images"] == 4
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("args, fragment", [
    (["--index", "/nonexistent/idx"], "not found"),
    ([], "no index given"),
    (["--index", ".", "--port", "99999"], "port"),
    (["--index", ".", "--config", "/nonexistent.toml"], "config file not found"),
])
def test_console_script_user_errors(args, fragment, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    proc = subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env=env, timeout=60)
    assert proc.returncode == 2
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_console_script_bad_index_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "service.cli", "--index", str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert proc.returncode == 1 and "cannot load index" in proc.stderr and "Traceback" not in proc.stderr


def _generations(url: str) -> dict[str, float]:
    """Per worker pid: the index generation it serves (multiprocess metrics)."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith("service_index_generation{"):
            out[line.split('pid="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def _wait_generation(url: str, gen: int, workers: int) -> dict[str, float]:
    for _ in range(600):
        g = _generations(url)
        if len(g) == workers and all(v == gen for v in g.values()):
            return g
        time.sleep(0.1)
    raise AssertionError(f"workers did not all reach generation {gen}: {g}")


def test_workers_share_port_metrics_and_every_swap(indexes, tmp_path):
    import httpx

    link = tmp_path / "current"
    link.symlink_to(indexes["a"])
    port = _free_port()
    env = {**os.environ, "SERVICE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--index", str(link), "--port", str(port),
                             "--workers", "2"], stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        _wait_generation(url, 1, 2)  # two worker processes, each with its own loaded index
        for _ in range(12):
            r = httpx.post(url + "/search/text", json={"query": "red dog", "k": 2}, timeout=60)
            assert r.status_code == 200 and len(r.json()["hits"]) == 2
        served = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(url + "/metrics").text.splitlines()
                     if line.startswith('service_requests_total{method="POST",route="/search/text",status="200"}'))
        assert served == 12  # summed over the workers, whichever answered

        link.unlink()
        link.symlink_to(indexes["b"])
        proc.send_signal(signal.SIGHUP)  # the supervisor forwards it: every worker swaps in place
        _wait_generation(url, 2, 2)
        assert all(httpx.get(url + "/readyz").json()["info"]["images"] == 4 for _ in range(6))

        r = httpx.post(url + "/admin/reload", json={"index_dir": str(indexes["a"])}, timeout=120)
        assert r.status_code == 200 and r.json()["index"]["generation"] == 3
        _wait_generation(url, 3, 2)  # the sibling worker loaded the announced index too
        assert all(httpx.get(url + "/readyz").json()["info"]["images"] == 6 for _ in range(6))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0


def test_workers_bad_index_fails_before_serving(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "service.cli", "--index", str(tmp_path), "--workers", "2"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 1 and "cannot load index" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_peers_announce_and_claim(tmp_path):
    """The control-file protocol between workers: an announce wakes the supervisor, and every
    other worker claims the new target exactly once (a second signal mid-load queues nothing)."""
    from service.peers import RELOAD_SIGNAL, Peers

    got: list[int] = []
    old = signal.signal(RELOAD_SIGNAL, lambda sig, frame: got.append(sig))
    try:
        control = tmp_path / "reload.json"
        origin, sibling = Peers(control, os.getpid()), Peers(control, os.getpid())
        assert sibling.claim() is None  # nothing announced yet: serve the configured index
        origin.announce(tmp_path / "a")
        assert got == [RELOAD_SIGNAL]
        assert origin.claim() is None  # the announcing worker has it loaded already
        seq, target = sibling.claim()
        assert target == (tmp_path / "a").resolve()
        assert sibling.claim() is None  # claimed: a repeated signal does not load it twice
        origin.announce(tmp_path / "b")
        assert sibling.claim()[1] == (tmp_path / "b").resolve()
        control.unlink()  # what the supervisor does on SIGHUP: the configured dir rules again
        assert Peers(control, os.getpid()).claim() is None
    finally:
        signal.signal(RELOAD_SIGNAL, old)
