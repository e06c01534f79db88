"""What `encoder evaluate --index` ranks is what the HTTP API answers, query by query: the
Flickr8k test index (the demo's, built by the committed default model), 200 captions, each
one's top 10 over HTTP against the evaluation's ranking of the same caption."""
from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import FLICKR
from encoder.cli import INDEX_TEXT_RUNTIME
from encoder.evaluate import texts_by_length
from encoder.model import DEFAULT_CHECKPOINT
from encoder.ranking import rank
from indexer.evaluation import index_collection
from indexer.searcher import Searcher
from service.app import create_app
from service.demo import ensure_demo_index
from service.settings import ServiceSettings

pytestmark = [
    pytest.mark.skipif(not (FLICKR / "pairs.jsonl").is_file(), reason=f"Flickr8k not found at {FLICKR}"),
    pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no committed default model"),
]


@pytest.fixture(scope="module")
def flickr_test_index():
    return ensure_demo_index(split="test", progress=False)


def test_evaluation_uses_the_services_text_runtime():
    assert ServiceSettings().text_runtime == INDEX_TEXT_RUNTIME


def test_http_top10_equals_the_evaluation_ranking(flickr_test_index):
    # the evaluation's side, as `encoder evaluate --index` runs it: its own Searcher, the service's
    # text runtime, the split's captions encoded in length-sorted batches, ranked by the engine
    evaluator = Searcher(flickr_test_index)
    evaluator.encoder.set_text_runtime(INDEX_TEXT_RUNTIME)
    col, img_ids, _ = index_collection(evaluator, {"split": "test"})
    assert len(img_ids) == 1000 and len(col.captions) == 5000
    pick = np.random.default_rng(0).choice(len(col.captions), 200, replace=False)
    texts = [col.captions[i] for i in pick]
    queries, = texts_by_length(texts, lambda t: (evaluator.encoder.encode_texts(t),))
    K = 100  # the evaluation's two-stage depth, and the service's default candidates
    want = rank(evaluator, evaluator.score, queries, True, "image", K, K, rerank=True).ids[:, :10]
    # the service's side: HTTP, one query at a time, default settings
    app = create_app(ServiceSettings(index_dir=flickr_test_index, background_load=False))
    with TestClient(app) as c:
        got = []
        for text in texts:
            r = c.post("/search/text", json={"query": text, "k": 10})
            assert r.status_code == 200, r.text
            got.append([h["id"] for h in r.json()["hits"]])
    differ = [(texts[q], got[q], want[q].tolist()) for q in range(len(texts)) if got[q] != want[q].tolist()]
    assert differ == []
