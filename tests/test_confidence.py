"""Calibrated confidence: the Platt fit, its storage in the checkpoint, the searcher's hit
confidences and the service's `min_confidence` cut (HTTP, sharded backend, web page)."""
from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from encoder.cli import main as encoder_main
from encoder.confidence import calibrate, fit_platt, top_results, write_score
from encoder.config import ScoreConfig
from encoder.heads import Embeddings
from encoder.model import TGDTModel, checkpoint_digest
from service.app import create_app
from fakes import FakeSearcher
from service.settings import ServiceSettings


# --- the fit -----------------------------------------------------------------------------------------
def test_fit_recovers_a_known_logistic_relation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, generator=g) * 1.5 + 0.3
    y = torch.rand(40_000, generator=g) < torch.sigmoid(4.0 * x - 2.0)
    a, b = fit_platt(x, y)
    assert a == pytest.approx(4.0, rel=0.06) and b == pytest.approx(-2.0, abs=0.12)


def test_fit_needs_matches_and_non_matches():
    with pytest.raises(ValueError, match="both are needed"):
        fit_platt(torch.randn(50), torch.zeros(50, dtype=torch.bool))


def test_top_results_label_ground_truth_matches_both_ways():
    """Identity-like embeddings: caption c belongs to image c // 2 and is closest to it."""
    n, dim = 4, 8
    img = torch.nn.functional.normalize(torch.eye(n, dim) + 0.01, dim=-1)
    cap = img.repeat_interleave(2, 0)
    emb = lambda g: Embeddings(g, g[:, None, :], torch.ones(len(g), 1, dtype=torch.bool), None)  # noqa: E731
    res = top_results(emb(img), emb(cap), torch.arange(2 * n) // 2, ScoreConfig(), top=3)
    for mode in ("rerank", "global"):
        (st, mt), (si, mi) = res[mode]["t2i"], res[mode]["i2t"]
        assert st.shape == mt.shape == (2 * n, 3) and si.shape == mi.shape == (n, 3)
        assert mt[:, 0].all() and mi[:, 0].all()  # every query's best result is a match
        assert mt.sum() == 2 * n  # a caption has one image
        assert mi.sum() == 2 * n  # an image has two captions, both in its top 3
        assert (st[:, :-1] >= st[:, 1:]).all() and (si[:, :-1] >= si[:, 1:]).all()


# --- stored with the checkpoint ------------------------------------------------------------------------
def test_calibration_is_stored_in_the_checkpoint_and_reloaded(tiny_checkpoint, split_collection, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    col = split_collection(tmp_path / "col")
    assert TGDTModel.from_pretrained(ckpt).config.score.confidence_rerank is None
    before = checkpoint_digest(ckpt)
    weights = (ckpt / "model.safetensors").read_bytes()
    summary = calibrate(ckpt, col, "val", device="cpu")
    score = TGDTModel.from_pretrained(ckpt).config.score
    for mode in ("rerank", "global"):
        stored = getattr(score, f"confidence_{mode}")
        assert stored == pytest.approx((summary[mode]["a"], summary[mode]["b"]))
        assert 0 < summary[mode]["matches"] < summary[mode]["results"]
    assert checkpoint_digest(ckpt) != before and (ckpt / "model.safetensors").read_bytes() == weights
    assert score.alpha == TGDTModel.from_pretrained(tiny_checkpoint).config.score.alpha  # the rest is kept
    # the CLI: same fit, one line per mode; a missing checkpoint is exit 2 with a one-line reason
    assert encoder_main(["calibrate-confidence", "--checkpoint", str(ckpt), "--data", str(col),
                         "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "rerank: confidence = sigmoid(" in out and "rebuild" in out
    assert encoder_main(["calibrate-confidence", "--checkpoint", str(tmp_path / "nope"), "--data", str(col)]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint" in err and "Traceback" not in err


# --- the searcher ----------------------------------------------------------------------------------------
@pytest.fixture()
def calibrated_index(tiny_checkpoint, tiny_collection, tmp_path):
    from indexer.build import build
    from indexer.config import BuildConfig

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    write_score(ckpt, ScoreConfig(confidence_rerank=(5.0, -1.0), confidence_global=(20.0, -3.0)))
    out = tmp_path / "index"
    build(BuildConfig(images=str(tiny_collection), captions=str(tiny_collection / "pairs.jsonl"), out=str(out),
                      checkpoint=str(ckpt), progress=False, faiss="flat"))
    return out


def test_hit_confidence_is_a_probability_monotone_in_the_score(calibrated_index):
    from indexer.searcher import Searcher

    s = Searcher(calibrated_index)
    for mode, (a, b) in (("rerank", (5.0, -1.0)), ("global", (20.0, -3.0))):
        hits = s.search_text("red dog on the beach", k=6, mode=mode).hits
        assert len(hits) == 6
        conf = [h.confidence for h in hits]
        assert all(0.0 <= c <= 1.0 for c in conf)
        assert conf == sorted(conf, reverse=True)  # hits come by score, so by confidence
        assert conf == pytest.approx([float(torch.sigmoid(torch.tensor(a * h.score + b, dtype=torch.float64)))
                                      for h in hits], abs=1e-6)
    img = Image.new("RGB", (40, 40), (120, 30, 200))
    assert all(h.confidence is not None for h in s.search_image(img, k=4, target="captions").hits)
    assert all(h.confidence is None for h in s.search_image(img, k=4, target="images").hits)
    s.score = s.score.model_copy(update={"confidence_rerank": None})  # a checkpoint without a calibration
    assert all(h.confidence is None for h in s.search_text("red dog", k=3).hits)


# --- the service ---------------------------------------------------------------------------------------
@pytest.fixture()
def client(tmp_path):
    with TestClient(create_app(ServiceSettings(index_dir=tmp_path), searcher=FakeSearcher(tmp_path / "a"))) as c:
        yield c


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_min_confidence_drops_the_hits_below_it(client):
    full = client.post("/search/text", json={"query": "a red dog", "k": 8}).json()["hits"]
    conf = [h["confidence"] for h in full]
    assert all(0.0 <= c <= 1.0 for c in conf) and conf == sorted(conf, reverse=True) and conf[0] > conf[-1]
    cut = (conf[2] + conf[3]) / 2 if conf[2] > conf[3] else conf[2]
    r = client.post("/search/text", json={"query": "a red dog", "k": 8, "min_confidence": cut})
    assert r.status_code == 200, r.text
    kept = r.json()["hits"]
    assert [h["id"] for h in kept] == [h["id"] for h in full if h["confidence"] >= cut]
    assert 0 < len(kept) < 8 and r.json()["k"] == 8  # fewer than k come back
    assert client.post("/search/text", json={"query": "a red dog", "min_confidence": 1.0}).json()["hits"] == []
    # image -> captions is cut the same way (JSON and form); image -> image hits have no confidence: kept
    caps = client.post("/search/image", files={"file": ("q.jpg", _jpeg(), "image/jpeg")}, data={"k": "8"}).json()
    cc = [h["confidence"] for h in caps["hits"]]
    form = client.post("/search/image", files={"file": ("q.jpg", _jpeg(), "image/jpeg")},
                       data={"k": "8", "min_confidence": str(cc[3])}).json()
    assert [h["id"] for h in form["hits"]] == [h["id"] for h in caps["hits"] if h["confidence"] >= cc[3]]
    sim = client.post("/search/image", files={"file": ("q.jpg", _jpeg(), "image/jpeg")},
                      data={"k": "5", "target": "images", "min_confidence": "0.99"}).json()
    assert len(sim["hits"]) == 5 and all(h["confidence"] is None for h in sim["hits"])


@pytest.mark.parametrize("bad", [-0.1, 1.5, "high", None])
def test_invalid_min_confidence_is_a_422(client, bad):
    body = {"query": "a red dog"} | ({"min_confidence": bad} if bad is not None else {})
    if bad is None:  # null is "no cut"
        assert client.post("/search/text", json=body | {"min_confidence": None}).status_code == 200
        return
    r = client.post("/search/text", json=body)
    assert r.status_code == 422 and "min_confidence" in r.text
    r = client.post("/search/image", files={"file": ("q.jpg", _jpeg(), "image/jpeg")},
                    data={"min_confidence": str(bad)})
    assert r.status_code == 422 and "min_confidence" in r.json()["message"] + json.dumps(r.json().get("errors"))


def test_sharded_backend_cuts_after_the_merge(tmp_path, tiny_checkpoint):
    """min_confidence cuts the merged answer (the app's cut after the backend), never a shard's."""
    from test_shard_merge import build_shard_indexes, sharded

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    write_score(ckpt, ScoreConfig(confidence_rerank=(5.0, -1.0), confidence_global=(20.0, -3.0)))
    idx = build_shard_indexes(tmp_path, ckpt)
    client = TestClient(create_app(ServiceSettings(background_load=False), searcher=sharded(idx)))
    full = client.post("/search/text", json={"query": idx["queries"][0], "k": 10}).json()["hits"]
    conf = [h["confidence"] for h in full]
    assert len(full) == 10 and conf == sorted(conf, reverse=True)
    cut = conf[4]
    r = client.post("/search/text", json={"query": idx["queries"][0], "k": 10, "min_confidence": cut})
    assert r.status_code == 200, r.text
    assert [h["id"] for h in r.json()["hits"]] == [h["id"] for h in full if h["confidence"] >= cut]
    assert client.post("/search/text", json={"query": "cat", "min_confidence": 2}).status_code == 422


# --- the web page ----------------------------------------------------------------------------------------
from test_web_page import page, server  # noqa: E402,F401  (browser fixtures; they skip without Chromium)


def test_page_shows_confidence_and_hides_hits_below_the_minimum(page, server):
    page.wait_for_function("document.getElementById('index-info').textContent.includes('generation')")
    page.fill("#query", "red dog")
    with page.expect_response("**/search/text") as resp:
        page.press("#query", "Enter")
    hits = resp.value.json()["hits"]
    page.wait_for_selector(".card")
    assert "confidence" in page.locator(".card").first.locator(".scores").inner_text()
    assert page.locator(".card:visible").count() == len(hits)
    cut = sorted(h["confidence"] for h in hits)[len(hits) // 2]
    step = round(cut * 20) / 20  # the slider moves in steps of 0.05
    page.eval_on_selector("#min-confidence", f"e => {{ e.value = '{step}'; e.dispatchEvent(new Event('input')); }}")
    below = sum(h["confidence"] < step for h in hits)
    assert page.locator(".card:visible").count() == len(hits) - below
    assert f"{below} of {len(hits)} results below confidence {step:.2f} hidden" in page.inner_text("#cut")
    page.eval_on_selector("#min-confidence", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    assert page.locator(".card:visible").count() == len(hits)
