"""The shard -> merge half of the Ray build, without Ray: the decode and encoder-actor code runs
in-process on shuffled, uneven batches (as a cluster would deliver them), and the merged index
must equal the single-machine build. Runs where Ray is not installed (CI without `.[cluster]`)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer import ray_build as rb
from indexer.build import build
from indexer.config import BuildConfig
from indexer.manifest import META, REPORT, read_manifest


def fake_encode_shards(sizes: list[int], seed: int):
    """Stand-in for `encode_shards`: same stage code, batches of `sizes` in a shuffled order."""

    def run(cfg: BuildConfig, rc: rb.RayConfig, source, shard_dir: Path) -> dict:
        shard_dir.mkdir(parents=True, exist_ok=True)
        paths = [e.path for e in source.entries]
        entries = [(e.path, list(e.captions)) for e in source.entries]
        actor = rb._EncodeActor(cfg.model_dump_json(), str(shard_dir), entries, "cpu")
        order = np.random.default_rng(seed).permutation(len(paths))
        start, n = 0, 0
        for size in sizes:
            pos = np.sort(order[start:start + size])  # non-contiguous positions, as blocks interleave
            start += size
            if len(pos) == 0:
                continue
            batch = rb._decode_batch({"pos": pos}, str(source.root), paths, cfg.checkpoint)
            actor(batch)
            n += 1
        assert start >= len(paths)
        return {"encode_seconds": 0.0, "shards": n, "images": len(paths), "device": "cpu"}

    return run


def rows(index: Path) -> list[tuple]:
    con = sqlite3.connect(index / META)
    try:
        return [tuple(r) for r in con.execute("SELECT * FROM items ORDER BY id")]
    finally:
        con.close()


@pytest.mark.parametrize("sizes,seed", [([3, 1, 4, 2], 0), ([8], 1), ([1] * 8, 2)])
def test_shards_merge_into_the_single_machine_index(messy_collection, tiny_checkpoint, tmp_path, monkeypatch,
                                                    sizes, seed):
    col = messy_collection
    base = BuildConfig(images=str(col), captions=str(col / "pairs.jsonl"), out=str(tmp_path / "local"),
                       checkpoint=str(tiny_checkpoint), batch_size=3, workers=0, progress=False)
    build(base)
    monkeypatch.setattr(rb, "encode_shards", fake_encode_shards(sizes, seed))
    m = rb.ray_build(base.model_copy(update={"out": str(tmp_path / "merged")}))
    local, merged = tmp_path / "local", tmp_path / "merged"
    assert m.counts == read_manifest(local).counts
    assert rows(merged) == rows(local)
    assert json.loads((merged / REPORT).read_text())["summary"] == {"skipped": 1, "duplicate": 1, "missing": 0, "bad_line": 0}
    from indexer.searcher import Searcher

    a, b = Searcher(local), Searcher(merged)
    for q in ["red dog runs", "blue cat sits on snow", "same photo again"]:
        ha, hb = a.search_text(q, k=5).hits, b.search_text(q, k=5).hits
        assert [h.id for h in ha] == [h.id for h in hb]
        np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=1e-3)
    assert not (merged / rb.SHARDS).exists()


def test_overlapping_shards_are_refused(tiny_collection, tiny_checkpoint, tmp_path, monkeypatch):
    base = BuildConfig(images=str(tiny_collection), captions=str(tiny_collection / "pairs.jsonl"),
                       out=str(tmp_path / "idx"), checkpoint=str(tiny_checkpoint), batch_size=4, workers=0,
                       progress=False)
    def twice(cfg, rc, source, shard_dir):  # a stale shard set from an earlier run: every position twice
        out = fake_encode_shards([6], 0)(cfg, rc, source, shard_dir)
        fake_encode_shards([6], 1)(cfg, rc, source, shard_dir)
        return out

    monkeypatch.setattr(rb, "encode_shards", twice)
    with pytest.raises(rb.BuildError, match="overlap"):
        rb.ray_build(base)


def test_missing_ray_is_a_clear_build_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(rb.BuildError, match=r"pip install -e '\.\[cluster\]'"):
        rb._init_ray(rb.RayConfig())
