"""Which file is a hit (issue 13 item 3): every hit and item carries the collection-relative path
and the captions file's own id; `GET /items?path=|user_id=` finds an item; indexes from before
user ids still serve; the service CLI says what went wrong, in one line, for each user mistake."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.build import build
from indexer.config import BuildConfig
from indexer.searcher import SearchError, Searcher
from service.app import create_app
from service.settings import ServiceSettings
from test_collection_inputs import jsonl, photos


def collection(root: Path, n: int = 4) -> Path:
    photos(root / "photos", [f"x{i}.jpg" for i in range(n)])
    jsonl(root / "pairs.jsonl", [{"image": f"photos/x{i}.jpg", "captions": [f"red dog {i}", f"blue ball {i}"],
                                  "photo_id": f"P-{i}", "id": 100 + i} for i in range(n)])
    return root


def build_at(col: Path, out: Path, ckpt: Path, **kw) -> Path:
    build(BuildConfig(images=str(col), captions=str(col / "pairs.jsonl"), out=str(out), checkpoint=str(ckpt),
                      workers=0, batch_size=4, progress=False, **kw))
    return out


@pytest.fixture()
def served(tmp_path, tiny_checkpoint):
    out = build_at(collection(tmp_path / "col"), tmp_path / "idx", tiny_checkpoint, id_field="photo_id")
    with TestClient(create_app(ServiceSettings(index_dir=out), searcher=Searcher(out))) as c:
        yield c, tmp_path


def test_hits_and_items_say_which_file_and_record_they_are(served):
    c, tmp = served
    r = c.post("/search/text", json={"query": "red dog", "k": 4})
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert {(h["id"], h["path"], h["user_id"]) for h in hits} == {(i, f"photos/x{i}.jpg", f"P-{i}") for i in range(4)}
    assert str(tmp) not in json.dumps(hits)  # never a server path
    caps = c.post("/search/image", files={"file": ("q.jpg", (tmp / "col/photos/x2.jpg").read_bytes(), "image/jpeg")},
                  data={"k": "8"}).json()["hits"]
    assert all(h["path"] == f"photos/x{h['image_id']}.jpg" and h["user_id"] == f"P-{h['image_id']}" for h in caps)
    item = c.get("/items/1").json()
    assert item["path"] == "photos/x1.jpg" and item["user_id"] == "P-1" and item["image_url"] == "/images/1"
    assert item["captions"] == ["red dog 1", "blue ball 1"] and item["metadata"]["id"] == 101
    cap = c.get(f"/items/{caps[0]['id']}").json()
    assert cap["kind"] == "caption" and cap["path"] == caps[0]["path"] and cap["user_id"] == caps[0]["user_id"]
    for query, want in (("path=photos/x2.jpg", 2), ("path=photos/sub/../x3.jpg", 3), ("user_id=P-0", 0)):
        r = c.get(f"/items?{query}")
        assert r.status_code == 200 and r.json()["id"] == want, (query, r.text)
        assert str(tmp) not in r.text and r.json()["path"].startswith("photos/x")
    for query, status in (("path=photos/none.jpg", 404), ("user_id=P-9", 404), ("", 422),
                          ("path=a.jpg&user_id=P-1", 422), ("path=", 422)):
        r = c.get(f"/items?{query}")
        assert r.status_code == status and r.json()["message"], (query, r.text)


def test_default_id_field_and_integer_ids(tmp_path, tiny_checkpoint):
    out = build_at(collection(tmp_path / "col"), tmp_path / "idx", tiny_checkpoint)  # no --id-field: 'id'
    s = Searcher(out)
    assert [h.user_id for h in sorted(s.search_text("red", k=4).hits, key=lambda h: h.id)] == [100, 101, 102, 103]
    assert s.item_by_user_id("102")["path"] == "photos/x2.jpg" and s.item_by_user_id(103)["id"] == 3


def _drop_user_ids(index: Path, absolute: dict[int, str]) -> None:
    """Turn a fresh index into one written before user ids (and before one-rule paths)."""
    from indexer.manifest import META, file_entries, read_manifest, write_manifest

    con = sqlite3.connect(index / META)
    con.execute("DROP INDEX items_user")
    con.execute("ALTER TABLE items DROP COLUMN user_id")
    for i, p in absolute.items():
        con.execute("UPDATE items SET path=? WHERE id=?", (p, i))
    con.commit()
    con.close()
    m = read_manifest(index)
    write_manifest(index, m.model_copy(update={"files": {**m.files, **file_entries(index, [META])}}))


def test_an_index_from_before_user_ids_still_serves(tmp_path, tiny_checkpoint):
    from indexer.maintain import add

    col = collection(tmp_path / "col")
    out = build_at(col, tmp_path / "idx", tiny_checkpoint, id_field="photo_id")
    shutil.copy(col / "photos" / "x3.jpg", tmp_path / "outside.jpg")
    _drop_user_ids(out, {2: str((col / "photos" / "x2.jpg").resolve()), 3: str(tmp_path / "outside.jpg")})
    s = Searcher(out)
    with TestClient(create_app(ServiceSettings(index_dir=out), searcher=s)) as c:
        hits = {h["id"]: h for h in c.post("/search/text", json={"query": "red dog", "k": 4}).json()["hits"]}
        assert hits[0]["path"] == "photos/x0.jpg" and hits[0]["user_id"] is None
        assert hits[2]["path"] == "photos/x2.jpg"  # an old absolute path inside the collection: made relative
        assert hits[3]["path"] is None  # outside it: withheld, never sent as a server path
        r = c.get("/items?user_id=P-1")
        assert r.status_code == 422 and "rebuild" in r.json()["message"]
        assert c.get("/items/3").json()["path"] is None and str(tmp_path) not in c.get("/items/3").text
    with pytest.raises(SearchError, match="rebuild"):
        s.item_by_user_id("P-1")
    # adding to it upgrades the table: the new images have ids, the old ones keep none
    photos(col / "more", ["y.jpg"], seed=9)
    jsonl(col / "more" / "pairs.jsonl", [{"image": "y.jpg", "captions": ["a new one"], "photo_id": "P-new"}])
    add(out, images=str(col / "more"), captions=str(col / "more" / "pairs.jsonl"), workers=0, progress=False)
    s = Searcher(out)
    assert s.item_by_user_id("P-new")["path"] == "more/y.jpg" and s.item(0)["user_id"] is None


# ------------------------------------------------------------------ the service CLI's failure modes
def test_service_cli_failure_modes_say_what_went_wrong(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import uvicorn

    from conftest import make_tiny_checkpoint
    from service.cli import main

    served: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(kw))  # a load that passes serves nothing
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    col = collection(tmp_path / "col")
    out = build_at(col, tmp_path / "idx", ckpt)
    other = make_tiny_checkpoint(tmp_path / "other", seed=3)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(ckpt / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "bad.toml").write_text("port = [")

    def fails(args: list[str], code: int, needle: str) -> None:
        got = main(args)
        err = capsys.readouterr().err
        assert got == code and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("service: ") and needle in last, err

    fails(["--index", str(tmp_path / "nowhere")], 2, "index directory not found")
    fails(["--index", str(col)], 1, "not an index")
    fails(["--index", str(out), "--port", "99999"], 2, "invalid setting port")
    fails(["--index", str(out), "--config", str(tmp_path / "bad.toml")], 2, "bad.toml")
    fails(["--index", str(out), "--checkpoint", str(broken)], 1, "cannot load checkpoint")
    fails(["--index", str(out), "--checkpoint", str(other)], 1, "is not the model")
    assert not served
    assert main(["--index", str(out), "--checkpoint", str(ckpt), "--port", "0"]) == 0 and len(served) == 1
    make_tiny_checkpoint(ckpt, seed=5)  # the checkpoint the index names has become another model
    fails(["--index", str(out)], 1, "built with checkpoint")
    os.chmod(out / "meta.sqlite", 0)
    if not os.access(out / "meta.sqlite", os.R_OK):  # (root reads anything)
        fails(["--index", str(out)], 1, "cannot load index")


# ------------------------------------------------------------------ the web page
def test_served_page_shows_file_names_and_loads_captions_on_hover(tmp_path):
    from fakes import FakeSearcher

    with TestClient(create_app(ServiceSettings(index_dir=tmp_path), searcher=FakeSearcher(tmp_path / "a"))) as c:
        html, js = c.get("/").text, c.get("/static/app.js").text
        hits = c.post("/search/text", json={"query": "red dog", "k": 3}).json()["hits"]
        item = c.get(f"/items/{hits[0]['image_id']}").json()
    assert 'class="file"' in html and 'class="hover-caps"' in html
    assert "showFile(card, hit)" in js and "hit.path" in js and "/items/${imageId}" in js and "item.captions" in js
    assert hits[0]["path"].startswith("images/") and item["captions"] and all(" " in cap for cap in item["captions"])
    assert json.dumps(hits).count(str(tmp_path)) == 0


from test_web_page import page, server  # noqa: E402,F401  (the browser fixtures; they skip without Chromium)


def test_page_shows_each_hits_file_and_its_captions_on_hover(page, server):  # noqa: F811
    page.fill("#query", "red dog")
    page.press("#query", "Enter")
    page.wait_for_selector('.card[data-id="0"]')
    card = page.locator('.card[data-id="0"]')
    assert card.locator(".file").inner_text() == "a0.jpg · id a-0"
    assert card.locator(".file").get_attribute("title") == "images/a0.jpg"
    card.hover()
    page.wait_for_selector('.card[data-id="0"] .hover-caps.loaded', state="visible")
    assert card.locator(".hover-caps li").all_inner_texts() == ["a red dog on grass", "the dog is red"]
    assert card.locator("img").get_attribute("title") == "a red dog on grass\nthe dog is red"
