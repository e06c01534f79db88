"""indexer: build, search, evaluation through the index, bad input, resume, CLI."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from indexer.build import BuildError, build
from indexer.config import BuildConfig
from indexer.searcher import SearchError, Searcher
from service.contract import SearchBackend


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """FAISS's OpenMP k-means slows down ~7x when its 2 threads compete with other CI work."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def cfg(col: Path, out: Path, ckpt: Path, **kw) -> BuildConfig:
    base = dict(images=str(col), captions=str(col / "pairs.jsonl"), out=str(out), checkpoint=str(ckpt),
                workers=0, batch_size=2, progress=False)
    return BuildConfig(**{**base, **kw})


@pytest.fixture()
def built(tiny_collection, tiny_checkpoint, tmp_path) -> Path:
    out = tmp_path / "index"
    build(cfg(tiny_collection, out, tiny_checkpoint))
    return out


def test_build_writes_a_self_describing_index(built, tiny_checkpoint):
    m = json.loads((built / "manifest.json").read_text())
    assert m["counts"]["images"] == 6 and m["counts"]["captions"] == 12
    from encoder.model import checkpoint_digest
    from indexer.manifest import sha256_file

    assert m["checkpoint_digest"] == checkpoint_digest(tiny_checkpoint)
    assert m["faiss"]["image"]["factory"] == "Flat"  # auto on a tiny gallery
    for name, f in m["files"].items():
        assert sha256_file(built / name) == f["sha256"]
    assert not any(p.name.endswith(".partial") for p in built.parent.iterdir())
    with h5py.File(built / "tokens-000.h5") as f:
        rows = f["image/rows"]
        assert rows.chunks is None and rows.compression is None  # contiguous: memmap-able
        assert rows.shape == (6 * 16, 2 * 32)
        assert list(f["image/lengths"][...]) == [16] * 6
    con = sqlite3.connect(built / "meta.sqlite")
    assert con.execute("SELECT count(*) FROM items WHERE kind='caption'").fetchone()[0] == 12


def test_stored_vectors_match_fresh_encoding(built, tiny_collection):
    from encoder.data import load_pairs
    from encoder.evaluate import encode_collection

    s = Searcher(built)
    col = load_pairs(tiny_collection)
    images, captions = encode_collection(s.encoder, col, workers=0, progress=False)
    g = s.gather("image", np.arange(6))
    assert np.allclose(g.global_, images.global_.numpy(), atol=1e-5)
    assert np.allclose(g.tokens, images.tokens.numpy(), atol=2e-3)  # fp16 storage
    c = s.gather("caption", np.arange(6, 18))
    assert (c.mask.sum(1) == captions.mask.sum(1).numpy()).all()


@pytest.mark.parametrize("tokens", ["fp16", "int8"])
def test_rerank_scores_from_stored_rows_equal_decoded_blocks(tiny_collection, tiny_checkpoint, tmp_path, tokens,
                                                             mrsw_one):
    """The service scores candidates straight from stored codes; same numbers as decoding them."""
    out = tmp_path / "idx"
    build(cfg(tiny_collection, out, tiny_checkpoint, tokens=tokens))
    s = Searcher(out)
    for kind, query_is_text, ids in (("image", True, np.arange(6)), ("caption", False, np.arange(6, 18))):
        q = s.encoder.encode_texts(["red dog runs"]) if query_is_text else \
            s.encoder.encode_images([Image.open(tiny_collection / "images" / "img2.jpg")])
        qt, qm = q.tokens[0], q.mask[0]
        g = s.gather(kind, ids[::-1].copy())
        ref = mrsw_one(qt, qm, torch.from_numpy(g.tokens), torch.from_numpy(g.mask), query_is_text,
                       s.score.local_reduce)
        got = s.query_local_scores(kind, ids[::-1].copy(), qt, qm, query_is_text, s.score.local_reduce)
        assert torch.allclose(got, ref, atol=1e-5)


def test_tune_sets_nprobe_from_queries_and_refuses_bad_input(tiny_collection, tiny_checkpoint, tmp_path, capsys):
    from indexer.cli import main

    out = tmp_path / "ivf"
    build(cfg(tiny_collection, out, tiny_checkpoint, faiss="ivf"))
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(f"red dog {i}" for i in range(12)) + "\n\n")
    assert main(["tune", str(out), "--queries", str(queries)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["faiss"]["image"]["nprobe"] >= 1 and m["faiss"]["image"]["recall"] == 1.0
    assert "nprobe=" in capsys.readouterr().out
    assert Searcher(out).search_text("red dog", k=2).hits  # the index still loads and searches
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n")
    assert main(["tune", str(out), "--queries", str(few)]) == 2
    assert "at least 10" in capsys.readouterr().err
    assert main(["tune", str(built_flat := tmp_path / "flat"), "--queries", str(queries)]) == 2  # not an index
    build(cfg(tiny_collection, built_flat, tiny_checkpoint))
    assert main(["tune", str(built_flat), "--queries", str(queries)]) == 2
    assert "only IVF galleries" in capsys.readouterr().err


def test_search_text_image_filters_explain(built, tiny_collection):
    s = Searcher(built)
    res = s.search_text("red dog runs", k=3, explain=True)
    assert len(res.hits) == 3 and res.candidates == 6
    assert [h.score for h in res.hits] == sorted((h.score for h in res.hits), reverse=True)
    top = res.hits[0]
    assert top.kind == "image" and top.path.startswith("images/") and top.local_score is not None
    assert [a["word"] for a in top.alignment] == ["red", "dog", "runs"]
    assert all(0 <= a["row"] < 4 and 0 <= a["col"] < 4 and a["cell"] == 4 * a["row"] + a["col"]
               for a in top.alignment)
    assert set(res.timings) >= {"encode", "faiss", "rerank", "total"}
    # filters are applied inside FAISS: only matching ids come back
    res = s.search_text("red dog", k=5, filters={"n": [1, 2]})
    assert sorted(h.id for h in res.hits) == [1, 2]
    assert all(h.metadata["n"] in (1, 2) for h in res.hits)
    with pytest.raises(SearchError):
        s.search_text("x", filters={"nope": 1})
    assert s.metadata_fields == {"split", "n"}
    assert isinstance(s, SearchBackend)  # what the service is typed against
    # image -> captions, and the image itself is its own nearest image
    img = Image.open(tiny_collection / "images" / "img2.jpg")
    res = s.search_image(img, k=4, target="captions")
    assert all(h.kind == "caption" and h.caption and h.image_id is not None for h in res.hits)
    res = s.search_image(img, k=2, target="images")
    assert res.hits[0].id == 2 and res.hits[0].global_score == pytest.approx(1.0, abs=1e-4)
    assert s.item(2)["path"] == "images/img2.jpg" and s.item(6)["kind"] == "caption"
    assert s.item(999) is None
    assert s.image_path(2) == (tiny_collection / "images" / "img2.jpg").resolve()
    assert s.image_path(6) is None  # a caption has no file
    # global mode ranks by the stored global score only
    res = s.search_text("red dog runs", k=6, mode="global")
    assert all(h.local_score is None and h.score == h.global_score for h in res.hits)
    assert s.rerank_cost() > 0


def test_evaluation_through_index_reproduces_encoder(built, tiny_collection):
    from encoder.data import load_pairs
    from encoder.evaluate import encode_collection, evaluate_embeddings
    from indexer.evaluation import evaluate_index, index_collection

    s = Searcher(built)
    got, col = evaluate_index(s, k=4, workers=0, progress=False)
    col2 = load_pairs(tiny_collection)
    assert sorted(col.captions) == sorted(col2.captions)
    im2, cap2 = encode_collection(s.encoder, col2, workers=0, progress=False)
    want = evaluate_embeddings(im2, cap2, torch.tensor(col2.caption_image), s.encoder.score_config, k=4)
    for mode in ("global", "two_stage", "exhaustive"):
        assert got[mode]["rsum"] == pytest.approx(want[mode]["rsum"])
    # a filter restricts both galleries, and the search stays inside them
    col, img_ids, cap_ids = index_collection(s, filters={"n": [0, 1, 2]})
    assert len(col.images) == 3 and len(col.captions) == 6 and len(img_ids) == 3 and len(cap_ids) == 6
    res, _ = evaluate_index(s, filters={"n": [0, 1, 2]}, k=2, modes=("global", "two_stage"), workers=0,
                            progress=False)
    assert 0 <= res["two_stage"]["rsum"] <= 600 and res["global"]["t2i_medr"] <= 3


def test_bad_inputs_are_reported_not_fatal(tiny_collection, tiny_checkpoint, tmp_path):
    img = tiny_collection / "images"
    (img / "empty.jpg").write_bytes(b"")
    (img / "text.png").write_text("not an image")
    good = (img / "img0.jpg").read_bytes()
    (img / "trunc.jpg").write_bytes(good[: len(good) // 3])
    shutil.copy(img / "img1.jpg", img / "copy_of_1.jpg")
    with (tiny_collection / "pairs.jsonl").open("a") as f:
        f.write(json.dumps({"image": "images/ghost.jpg", "captions": ["a ghost"]}) + "\n")
        f.write(json.dumps({"image": "images/copy_of_1.jpg", "captions": ["dup caption"]}) + "\n")
    out = tmp_path / "index"
    m = build(cfg(tiny_collection, out, tiny_checkpoint))
    report = json.loads((out / "build_report.json").read_text())
    by_path = {p["path"]: p for p in report["problems"]}
    assert by_path["images/ghost.jpg"]["problem"] == "missing"
    assert by_path["images/copy_of_1.jpg"]["problem"] == "duplicate"
    assert "images/img1.jpg" in by_path["images/copy_of_1.jpg"]["reason"]
    for bad in ("empty.jpg", "text.png", "trunc.jpg"):
        assert by_path[f"images/{bad}"]["problem"] == "skipped" and by_path[f"images/{bad}"]["reason"]
    assert m.counts["images"] == 6  # nothing good was lost
    s = Searcher(out)
    dup = [h for h in s.search_text("dup caption", k=1).hits]
    con = sqlite3.connect(out / "meta.sqlite")
    owner = con.execute("SELECT image_id FROM items WHERE caption='dup caption'").fetchone()[0]
    assert owner == 1 and dup  # the duplicate's caption attaches to the kept image


def test_refuses_existing_output_unless_overwrite(built, tiny_collection, tiny_checkpoint):
    with pytest.raises(BuildError, match="already exists"):
        build(cfg(tiny_collection, built, tiny_checkpoint))
    m = build(cfg(tiny_collection, built, tiny_checkpoint, overwrite=True, tokens="int8"))
    assert m.token_form == "int8" and Searcher(built).manifest.token_form == "int8"


def _snapshot(out: Path) -> dict:
    con = sqlite3.connect(out / "meta.sqlite")
    items = con.execute("SELECT id, kind, path, caption, image_id, meta, sha256, segment, pos FROM items "
                        "ORDER BY id").fetchall()
    with h5py.File(out / "tokens-000.h5") as f:
        arrays = {f"{k}/{n}": f[f"{k}/{n}"][...] for k in ("image", "caption")
                  for n in ("rows", "global", "ids", "offsets", "lengths")}
    return {"items": items, **arrays}


def test_killed_build_resumes_to_the_same_index(tiny_collection, tiny_checkpoint, tmp_path):
    ref = tmp_path / "ref"
    build(cfg(tiny_collection, ref, tiny_checkpoint))  # same command, uninterrupted
    out = tmp_path / "index"

    def boom(n):
        if n == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(cfg(tiny_collection, out, tiny_checkpoint), on_batch=boom)
    assert not out.exists() and (tmp_path / "index.partial").is_dir()
    seen = []
    build(cfg(tiny_collection, out, tiny_checkpoint), on_batch=seen.append)
    assert len(seen) == 1  # only the third (last) batch of 2 images was encoded again
    a, b = _snapshot(ref), _snapshot(out)
    assert a["items"] == b["items"]
    for key in a:
        if key != "items":
            assert np.array_equal(a[key], b[key]), key
    assert not (tmp_path / "index.partial").exists()


def test_token_forms_bytes_and_fidelity(tiny_collection, tiny_checkpoint, tmp_path):
    from indexer.tokenstore import TokenCodec

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for form, nbytes, tol in (("fp16", 64, 1e-3), ("int8", 34, 0.02), ("pq8", 10, None)):  # pq: M code bytes + fp16 length
        c = TokenCodec(form, 32)
        if c.needs_training:
            c.train(x)
        codes = c.encode(x)
        assert codes.shape == (600, nbytes) and codes.dtype == np.uint8
        y = c.decode(codes)
        cos = (x * y).sum(1)
        if tol is not None:
            assert cos.min() > 1 - tol
        else:
            assert cos.mean() > 0.6  # 8 bytes for 32 dims: lossy but far from random
        c2 = TokenCodec.from_bytes(form, 32, c.to_bytes())
        assert np.array_equal(c2.decode(codes), y)
    # a pq build of a collection too small to train says so
    with pytest.raises(BuildError, match="needs >= 256"):
        build(cfg(tiny_collection, tmp_path / "pq", tiny_checkpoint, tokens="pq8"))


def test_faiss_kinds_remove_and_recall():
    from indexer import faiss_index
    from indexer.config import choose_faiss

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 16)).astype(np.float32)
    x = centers[rng.integers(0, 20, 2000)] + 0.3 * rng.standard_normal((2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(2000, dtype=np.int64) * 3 + 7
    q = x[:50]
    flat = faiss_index.build_index(x, ids, choose_faiss(2000, 16, "flat"))
    _, ref = faiss_index.search(flat, q, 10, choose_faiss(2000, 16, "flat"))
    assert (ref[:, 0] == ids[:50]).all()
    for kind in ("ivf", "hnsw", "ivfpq"):
        p = choose_faiss(2000, 16, kind)
        index = faiss_index.build_index(x, ids, p)
        _, got = faiss_index.search(index, q, 10, p)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, got)])
        assert recall > (0.3 if kind == "ivfpq" else 0.9), (kind, recall)  # PQ4 on 16-d is coarse
        # tombstones are excluded even where FAISS cannot remove (HNSW)
        _, got = faiss_index.search(index, q[:1], 5, p, deny=ids[:1])
        assert ids[0] not in got
    assert choose_faiss(1000, 256).kind == "flat"
    assert choose_faiss(1_000_000, 256).kind == "ivf"
    assert choose_faiss(10_000_000, 256).kind == "ivfpq"
    assert faiss_index.remove_ids(flat, ids[:3]) == 3 and flat.ntotal == 1997


def test_inputs_coco_csv_and_images_only(tmp_path):
    from indexer.inputs import InputError, read_source

    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.png", "sub/c.webp"):
        Image.new("RGB", (8, 8), "red").save(root / name)
    (root / "notes.txt").write_text("x")
    src = read_source(root)
    assert [e.path for e in src.entries] == ["a.jpg", "sub/b.png", "sub/c.webp"]
    coco = tmp_path / "cap.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "license": 3},
                                           {"id": 2, "file_name": "gone.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "a red square"},
                                                {"image_id": 2, "caption": "lost"}]}))
    src = read_source(root, coco)
    assert src.entries[0].captions == ["a red square"] and src.entries[0].meta == {"coco_id": 1, "license": 3}
    assert src.missing == [{"path": "gone.jpg", "reason": "named in the captions file but not found"}]
    csvf = tmp_path / "cap.csv"
    csvf.write_text("image,caption,source\nsub/b.png,blue thing,web\nsub/b.png,second,web\n")
    src = read_source(root, csvf)
    e = next(e for e in src.entries if e.path == "sub/b.png")
    assert e.captions == ["blue thing", "second"] and e.meta == {"source": "web"}
    with pytest.raises(InputError):
        read_source(tmp_path / "nope")


def test_cli_build_info_and_user_errors(tiny_collection, tiny_checkpoint, tmp_path, capsys):
    from indexer.cli import main

    out = tmp_path / "idx"
    args = ["build", "--images", str(tiny_collection), "--captions", str(tiny_collection / "pairs.jsonl"),
            "--out", str(out), "--checkpoint", str(tiny_checkpoint), "--workers", "0", "--quiet"]
    assert main(args) == 0
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["info", str(out), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 6 and info["captions"] == 12 and info["token_bytes_per_image"] == 16 * 64
    assert all(len(f["sha256"]) == 64 for f in info["files"].values()) and info["health"]["ok"]
    for bad in (["build", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
                ["build", "--images", str(tiny_collection), "--out", str(tmp_path / "y"), "--tokens", "zip"],
                ["info", str(tmp_path)],
                args[:-4] + [str(tmp_path), "--workers", "0", "--overwrite"]):
        assert main(bad) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("indexer: ") and len(err.strip().splitlines()) == 1, err
    assert main(["search", str(out), "--text", "red dog", "--k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def _extra_collection(root: Path, n: int = 3, seed: int = 5) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    with (root / "pairs.jsonl").open("w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)).save(root / "images" / f"new{i}.png")
            f.write(json.dumps({"image": f"images/new{i}.png", "captions": [f"zebra number {i} jumps"],
                                "split": "extra", "n": 100 + i}) + "\n")
    return root


@pytest.mark.parametrize("faiss_kind", ["flat", "hnsw"])
def test_add_remove_compact(tiny_collection, tiny_checkpoint, tmp_path, faiss_kind):
    from indexer.info import index_info
    from indexer.maintain import add, compact, remove

    out = tmp_path / "index"
    build(cfg(tiny_collection, out, tiny_checkpoint, faiss=faiss_kind))
    extra = _extra_collection(tiny_collection / "more")  # inside the images root
    m = add(out, images=str(extra), captions=str(extra / "pairs.jsonl"), workers=0, progress=False)
    assert m.counts["images"] == 9 and m.counts["captions"] == 15 and len(m.segments) == 2
    s = Searcher(out)
    new_ids = sorted(int(i) for i in s.tables["image"].ids if i >= 18)
    assert len(new_ids) == 3 and s.item(new_ids[0])["path"] == "more/images/new0.png"
    assert s.image_path(new_ids[0]) is not None
    img = Image.open(extra / "images" / "new1.png")
    hit = s.search_image(img, k=1, target="images").hits[0]
    assert hit.id == new_ids[1] and hit.metadata["split"] == "extra"
    caps = s.search_image(img, k=15, target="captions", filters={"split": "extra"}).hits
    assert {h.image_id for h in caps} == set(new_ids)
    # adding the same files again adds nothing and says why
    m = add(out, images=str(extra), captions=str(extra / "pairs.jsonl"), workers=0, progress=False)
    assert m.counts["images"] == 9
    # remove an image by path: it and its captions vanish from every search
    n = remove(out, paths=["images/img2.jpg"])
    assert n == {"images": 1, "captions": 2}
    s = Searcher(out)
    for q in ("red dog", "blue cat sits", "snow beach"):
        ids = {h.id for h in s.search_text(q, k=9).hits}
        assert 2 not in ids and len(ids) == 8
    caps = s.search_image(Image.open(tiny_collection / "images" / "img2.jpg"), k=20, target="captions").hits
    assert all(h.image_id != 2 for h in caps) and len(caps) == 13
    assert s.item(2) is None
    info = index_info(out, verify=True)
    assert info["images"] == 8 and info["deleted_images"] == 1 and info["health"]["ok"]
    with pytest.raises(ValueError, match="not in the index"):
        remove(out, ids=[2])
    before = [(h.id, round(h.score, 4)) for h in s.search_text("red dog runs", k=5).hits]
    m = compact(out)
    assert m.segments == ["tokens-000.h5"] and m.counts["deleted_images"] == 0 and m.counts["images"] == 8
    s = Searcher(out)
    assert [(h.id, round(h.score, 4)) for h in s.search_text("red dog runs", k=5).hits] == before
    assert index_info(out, verify=True)["health"]["ok"]
    assert not list(tmp_path.glob("index.*"))  # no staging or old copies left behind


def test_sigkilled_build_process_resumes(tiny_collection, tiny_checkpoint, tmp_path):
    """A real process killed with SIGKILL mid-build (no clean-up at all), then the same build."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "index"
    conf = cfg(tiny_collection, out, tiny_checkpoint, batch_size=1)
    script = ("import sys, time; from indexer.build import build; from indexer.config import BuildConfig; "
              "build(BuildConfig.model_validate_json(sys.argv[1]), on_batch=lambda n: time.sleep(0.5))")
    proc = subprocess.Popen([sys.executable, "-c", script, conf.model_dump_json()],
                            cwd=Path(__file__).resolve().parents[1])
    db = tmp_path / "index.partial" / "meta.sqlite"
    deadline = time.time() + 600  # importing torch on a loaded CI box can take a while
    position = 0
    while time.time() < deadline and proc.poll() is None:
        if db.is_file():
            try:
                row = sqlite3.connect(db).execute("SELECT value FROM progress WHERE key='position'").fetchone()
                position = int(row[0]) if row else 0
            except sqlite3.Error:
                position = 0
            if position >= 1:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= position < 6 and not out.exists(), position
    build(conf)
    ref = tmp_path / "ref"
    build(cfg(tiny_collection, ref, tiny_checkpoint, batch_size=1))
    a, b = _snapshot(ref), _snapshot(out)
    assert a["items"] == b["items"]
    for key in a:  # ids, offsets, lengths exact; floats from another process up to rounding
        if key.endswith("rows"):
            assert np.allclose(a[key].view(np.float16), b[key].view(np.float16), atol=1e-3), key
        elif key.endswith("global"):
            assert np.allclose(a[key], b[key], atol=1e-6), key
        elif key != "items":
            assert np.array_equal(a[key], b[key]), key


def test_pairs_jsonl_reads_the_same_for_the_encoder_and_the_indexer(tmp_path):
    from encoder.data import CollectionError, load_pairs
    from indexer.inputs import InputError, read_source

    root = tmp_path / "c"
    root.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8), "red").save(root / name)
    lines = [{"image": "a.jpg", "captions": ["one", "two"], "split": "test", "who": 1},
             {"image": "b.jpg", "caption": "single", "split": "test"},
             {"image": "c.jpg", "captions": ["other"], "split": "train"}]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    col = load_pairs(root, split="test")
    src = read_source(root, root / "pairs.jsonl", split="test")
    assert col.images == [e.path for e in src.entries] == ["a.jpg", "b.jpg"]
    assert col.captions == ["one", "two", "single"] and col.caption_image == [0, 0, 1]
    assert [e.captions for e in src.entries] == [["one", "two"], ["single"]]
    assert col.meta[0] == src.entries[0].meta == {"split": "test", "who": 1}
    (root / "pairs.jsonl").write_text(json.dumps(lines[0]) + "\n{not json\n")
    for read, error in ((lambda: load_pairs(root), CollectionError),
                        (lambda: read_source(root, root / "pairs.jsonl"), InputError)):
        with pytest.raises(error, match=r"pairs.jsonl:2: JSON syntax error at column 2"):
            read()


def test_faiss_like_reuses_a_trained_gallery_for_a_shard(tiny_collection, tiny_checkpoint, tmp_path, capsys):
    """Shards built `--faiss-like` one index share its trained lists (and nprobe), so they probe
    what that index probes; another model's index, or no index, is refused before encoding."""
    import faiss

    from indexer.cli import main

    whole = tmp_path / "whole"
    build(cfg(tiny_collection, whole, tiny_checkpoint, faiss="ivf"))
    rows = [json.loads(line) for line in (tiny_collection / "pairs.jsonl").read_text().splitlines()]
    (tiny_collection / "half.jsonl").write_text("".join(json.dumps({**r, "split": "ab"[i % 2]}) + "\n"
                                                        for i, r in enumerate(rows)))
    half = str(tiny_collection / "half.jsonl")
    shard = tmp_path / "shard"
    build(cfg(tiny_collection, shard, tiny_checkpoint, captions=half, split="a", faiss_like=str(whole)))
    mw, ms = (json.loads((d / "manifest.json").read_text()) for d in (whole, shard))
    assert ms["counts"]["images"] == 3 and ms["faiss"] == mw["faiss"] and ms["build"]["faiss_like"] == str(whole)
    for name in ("images.faiss", "captions.faiss"):
        kept = [faiss.read_index(str(d / name)) for d in (whole, shard)]  # (the extracts point into them)
        a, b = (faiss.extract_index_ivf(x) for x in kept)
        assert a.nlist == b.nlist and b.ntotal == 3 * (1 if name == "images.faiss" else 2)
        qa, qb = (faiss.downcast_index(x.quantizer) for x in (a, b))
        np.testing.assert_array_equal(qa.reconstruct_n(0, a.nlist), qb.reconstruct_n(0, b.nlist))
    assert Searcher(shard).search_text("red dog", k=3).hits

    other = tmp_path / "other"
    shutil.copytree(whole, other)
    m = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**m, "checkpoint_digest": "0" * 64}))
    with pytest.raises(BuildError, match="another model"):
        build(cfg(tiny_collection, tmp_path / "x", tiny_checkpoint, faiss_like=str(other)))
    assert main(["build", "--images", str(tiny_collection), "--captions", half, "--split", "a",
                 "--out", str(tmp_path / "y"), "--checkpoint", str(tiny_checkpoint), "--quiet",
                 "--faiss-like", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--faiss-like" in err and "Traceback" not in err and not (tmp_path / "y").exists()
