"""Issue 18, item 3: an index whose files no longer match its manifest's sha256 is never served as
healthy: the first load fails (or, for a token segment, readiness flips to 503 once the background
check ends), a hot swap to it is refused while the old index keeps serving, and `indexer verify`
and `indexer info --verify` name the file."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.cli import main as indexer_main
from indexer.manifest import MANIFEST
from service.app import create_app
from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
KEY = "adm-key"
OK, PENDING, FAILED = "ok", "pending", "failed"  # /readyz's `verified`


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_checkpoint) -> Path:
    from PIL import Image

    from indexer.build import build
    from indexer.config import BuildConfig

    root = tmp_path_factory.mktemp("verify")
    col = root / "col"
    (col / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    words = ["red", "blue", "dog", "cat", "ball", "beach", "runs", "sits"]
    with (col / "pairs.jsonl").open("w") as f:
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(col / "images" / f"{i}.jpg")
            f.write(json.dumps({"image": f"images/{i}.jpg", "captions": [" ".join(rng.choice(words, 4))]}) + "\n")
    out = root / "index"
    build(BuildConfig(images=str(col), captions=str(col / "pairs.jsonl"), out=str(out),
                      checkpoint=str(tiny_checkpoint), progress=False, faiss="flat"))
    return out


def garbage_in(path: Path, n: int = 4096) -> None:
    """Overwrite up to n bytes in the middle of the file with random bytes: same size, other content."""
    size = path.stat().st_size
    n = min(n, size // 2)
    with open(path, "r+b") as f:
        f.seek((size - n) // 2)
        f.write(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    assert path.stat().st_size == size


def damaged_copy(good: Path, where: Path, name: str) -> Path:
    """A copy of the index whose `name` differs from what its manifest records. A token segment
    keeps its bytes (so it still opens) and the manifest records another digest instead."""
    bad = where / f"bad-{name}"
    shutil.copytree(good, bad)
    if name.startswith("tokens-"):
        m = json.loads((bad / MANIFEST).read_text())
        m["files"][name]["sha256"] = "0" * 64
        (bad / MANIFEST).write_text(json.dumps(m))
    else:
        garbage_in(bad / name)
    return bad


def test_indexer_verify_names_the_damaged_file(good, tmp_path, capsys):
    assert indexer_main(["verify", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = damaged_copy(good, tmp_path, "images.faiss")
    assert indexer_main(["verify", str(bad)]) == 1
    cap = capsys.readouterr()
    assert "images.faiss: checksum mismatch" in cap.err and "FAILED" in cap.out
    assert indexer_main(["verify", str(bad), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["problems"] == ["images.faiss: checksum mismatch"]
    assert indexer_main(["info", str(bad), "--verify", "--json"]) == 1
    health = json.loads(capsys.readouterr().out)["health"]
    assert health == {"ok": False, "checked": "sha256", "problems": ["images.faiss: checksum mismatch"]}


def test_service_refuses_to_start_on_a_damaged_index(good, tmp_path):
    bad = damaged_copy(good, tmp_path, "images.faiss")
    # in process: the load fails, /readyz is 503 and searches too
    with TestClient(create_app(ServiceSettings(index_dir=bad))) as c:
        deadline = time.time() + 60
        while c.app.state.engine.loading and time.time() < deadline:
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and "images.faiss: checksum mismatch" in r.json()["message"]
        assert c.post("/search/text", json={"query": "dog"}).status_code == 503
    # the console script: one line, exit 1, before any port opens
    proc = subprocess.run([sys.executable, "-m", "service.cli", "--index", str(bad), "--port", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "images.faiss: checksum mismatch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_damaged_token_segment_found_in_the_background(good, tmp_path, caplog):
    bad = damaged_copy(good, tmp_path, "tokens-000.h5")
    caplog.set_level(logging.INFO, logger="service")
    with TestClient(create_app(ServiceSettings(index_dir=bad, background_load=False, api_key=KEY))) as c:
        deadline = time.time() + 60
        while c.get("/readyz").status_code == 200 and time.time() < deadline:
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"ready": False, "message": "the index failed verification",
                                                      "verified": FAILED}
        detail = c.get("/readyz", headers={"X-API-Key": KEY}).json()
        assert detail["verification"]["problems"] == ["tokens-000.h5: checksum mismatch"]
        r = c.post("/search/text", json={"query": "dog"}, headers={"X-API-Key": KEY})
        assert r.status_code == 503 and "tokens-000.h5" in r.json()["message"]
        assert "service_index_verified -1.0" in c.get("/metrics", headers={"X-API-Key": KEY}).text
    failed = [r.getMessage() for r in caplog.records if "failed verification" in r.getMessage()]
    assert failed and all("tokens-000.h5" in m and str(tmp_path) not in m for m in failed)


def test_good_index_verified_in_two_steps(good):
    from service.integrity import Verification

    v = Verification.before_load(good)  # everything but the token segments, before opening
    assert v.state == PENDING and v.pending == ["tokens-000.h5"] and 0 < v.checked_bytes < v.total_bytes
    v.start("test")
    assert v.wait(60) and v.state == OK and v.checked_bytes == v.total_bytes and not v.problems
    assert Verification.before_load(good, swap=True).state == OK  # a swap hashes all of it first
    swapped_out = Verification.before_load(good)
    swapped_out.stop()  # its index was swapped out: the background check gives up at the next block
    swapped_out.start("test")
    swapped_out._thread.join(60)
    assert swapped_out.state == PENDING and swapped_out.checked_bytes < swapped_out.total_bytes
    assert Verification.before_load(good, "off").state == "off"
    with TestClient(create_app(ServiceSettings(index_dir=good, background_load=False))) as c:
        assert c.app.state.engine.handle.verification.wait(60)
        body = c.get("/readyz").json()
        assert body["ready"] and body["verified"] == OK and body["verification"]["problems"] == []


@pytest.mark.parametrize("name", ["images.faiss", "meta.sqlite", "tokens-000.h5"])
def test_hot_swap_to_a_damaged_index_is_refused(good, tmp_path, name):
    bad = damaged_copy(good, tmp_path, name)
    settings = ServiceSettings(index_dir=good, background_load=False, admin_key=KEY)
    with TestClient(create_app(settings)) as c:
        r = c.post("/admin/reload", json={"index_dir": str(bad)}, headers={"X-API-Key": KEY})
        assert r.status_code == 400 and f"{name}: checksum mismatch" in r.json()["message"]
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["index"]["generation"] == 1  # the old one serves
        assert ready.json()["index"]["index_dir"] == str(good)
        assert c.post("/search/text", json={"query": "dog", "k": 2}).status_code == 200
        # and a good index still swaps in
        r = c.post("/admin/reload", json={"index_dir": str(good)}, headers={"X-API-Key": KEY})
        assert r.status_code == 200 and r.json()["index"]["generation"] == 2
        deadline = time.time() + 30
        while c.get("/readyz").json()["verified"] != OK and time.time() < deadline:
            time.sleep(0.05)
        assert c.get("/readyz").json()["verified"] == OK
