"""Ray build: decoding and encoding spread over a (local) Ray cluster must produce the same index
as the single-machine build — same rows, ids, duplicate/skip report, vectors and answers."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")

from indexer.build import build  # noqa: E402
from indexer.config import BuildConfig  # noqa: E402
from indexer.manifest import META, REPORT, read_manifest  # noqa: E402
from indexer.ray_build import RayConfig, ray_build  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """One local cluster for the module: 2 CPUs, the way a 2-core CI box looks."""
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except Exception as e:  # Ray's raylet must register within a fixed 30 s: an overloaded box cannot
        ray.shutdown()
        pytest.skip(f"a local Ray node could not start on this machine: {str(e).splitlines()[0]}")
    yield
    ray.shutdown()


def rows(index: Path) -> list[tuple]:
    con = sqlite3.connect(index / META)
    try:
        cols = [r[1] for r in con.execute("PRAGMA table_info(items)")]
        return [tuple(r) for r in con.execute(f"SELECT {', '.join(cols)} FROM items ORDER BY id")]
    finally:
        con.close()


def datasets(index: Path) -> dict[str, np.ndarray]:
    import h5py

    out: dict[str, np.ndarray] = {}
    for seg in read_manifest(index).segments:
        with h5py.File(index / seg, "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(f"{seg}/{name}", obj[()])
                         if isinstance(obj, h5py.Dataset) else None)
    return out


def test_ray_build_equals_local_build(local_ray, messy_collection, tiny_checkpoint, tmp_path):
    col = messy_collection
    base = BuildConfig(images=str(col), captions=str(col / "pairs.jsonl"), out=str(tmp_path / "local"),
                       checkpoint=str(tiny_checkpoint), batch_size=3, workers=0, progress=False)
    build(base)
    ray_cfg = base.model_copy(update={"out": str(tmp_path / "ray")})
    m = ray_build(ray_cfg, RayConfig(encoders=2, encoder_cpus=0.5, decode_cpus=0.5, blocks=4))
    local, dist = tmp_path / "local", tmp_path / "ray"

    ml = read_manifest(local)
    assert m.counts == ml.counts and m.counts["images"] == 6  # the copy folds into img1, broken is skipped
    assert m.faiss == ml.faiss and m.token_form == ml.token_form and m.checkpoint_digest == ml.checkpoint_digest
    assert rows(dist) == rows(local)
    summary = json.loads((dist / REPORT).read_text())["summary"]
    assert summary == json.loads((local / REPORT).read_text())["summary"] == {"skipped": 1, "duplicate": 1, "missing": 0, "bad_line": 0}
    a, b = datasets(local), datasets(dist)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype.kind == "f":
            np.testing.assert_allclose(a[key].astype(np.float32), b[key].astype(np.float32), atol=2e-3, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not (dist / "shards").exists() and not Path(str(dist) + ".partial").exists()


def test_ray_build_answers_like_local_build(local_ray, tiny_collection, tiny_checkpoint, tmp_path):
    from indexer.searcher import Searcher

    col = tiny_collection
    base = BuildConfig(images=str(col), captions=str(col / "pairs.jsonl"), out=str(tmp_path / "local"),
                       checkpoint=str(tiny_checkpoint), batch_size=4, workers=0, progress=False)
    build(base)
    ray_build(base.model_copy(update={"out": str(tmp_path / "ray")}), RayConfig(encoders=1, blocks=10))
    s_local, s_ray = Searcher(tmp_path / "local"), Searcher(tmp_path / "ray", encoder=None)
    queries = [json.loads(line)["captions"][0] for line in (col / "pairs.jsonl").read_text().splitlines()]
    for q in queries:
        hl, hr = s_local.search_text(q, k=6).hits, s_ray.search_text(q, k=6).hits
        assert [h.id for h in hl] == [h.id for h in hr], q
        np.testing.assert_allclose([h.score for h in hl], [h.score for h in hr], atol=1e-3)


def test_ray_build_refuses_existing_output(local_ray, tiny_collection, tiny_checkpoint, tmp_path):
    from indexer.build import BuildError

    out = tmp_path / "idx"
    out.mkdir()
    cfg = BuildConfig(images=str(tiny_collection), out=str(out), checkpoint=str(tiny_checkpoint), progress=False)
    with pytest.raises(BuildError, match="already exists"):
        ray_build(cfg, RayConfig())
