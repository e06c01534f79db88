"""The demo: builds its index from scikit-image's bundled photos when Flickr8k is absent."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("indexer.build", reason="indexer.build is not in this checkout")
pytest.importorskip("skimage", reason="scikit-image is not installed")

from service.demo import SKIMAGE_PHOTOS, ensure_demo_index, skimage_captions  # noqa: E402


def test_skimage_captions_are_the_documented_descriptions():
    assert skimage_captions("astronaut")[0] == "Color image of the astronaut Eileen Collins"
    assert skimage_captions("coffee") == ["Coffee cup", "This photograph is courtesy of Pikolo Espresso Bar"]
    assert all(not c.startswith("Returns") for c in skimage_captions("brick"))


def test_demo_index_from_skimage_then_reused(tmp_path, tiny_checkpoint, capsys):
    idx = ensure_demo_index(tmp_path / "demo", data=tmp_path / "no-flickr", checkpoint=tiny_checkpoint,
                            progress=False)
    pairs = [json.loads(x) for x in (tmp_path / "skimage-photos" / "pairs.jsonl").read_text().splitlines()]
    assert [p["name"] for p in pairs] == list(SKIMAGE_PHOTOS)
    from indexer.searcher import Searcher

    s = Searcher(idx)
    assert s.info["images"] == len(SKIMAGE_PHOTOS)
    hit = s.search_text("astronaut", k=1).hits[0]
    assert s.image_path(hit.id).is_file()
    again = ensure_demo_index(tmp_path / "demo", data=tmp_path / "no-flickr", checkpoint=tiny_checkpoint,
                              progress=False)
    assert again == idx and "using the existing index" in capsys.readouterr().err
