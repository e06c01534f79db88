"""Collections as people lay them out (issue 13 items 1-2, issue 18 items 4-5): symlinked photos,
captions files beside or above the images folder, names to normalise, inputs that are wrong in
a way the build must explain instead of indexing nothing (or the wrong thing) silently."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.build import BuildError, build
from indexer.cli import main as indexer_main
from indexer.config import BuildConfig
from indexer.inputs import InputError, read_source


def photos(folder: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)).save(folder / name)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(images: Path, captions: Path | None, out: Path, ckpt: Path, **kw) -> BuildConfig:
    return BuildConfig(images=str(images), captions=str(captions) if captions else None, out=str(out),
                       checkpoint=str(ckpt), workers=0, batch_size=4, progress=False, **kw)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = indexer_main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("indexer: "), err
    return lines[0]


# ------------------------------------------------------------------ issue 13 item 1: symlinks
def test_symlinked_photos_named_in_a_captions_file_are_indexed(tmp_path, tiny_checkpoint):
    store = tmp_path / "annex" / "objects"  # where git-annex / DVC / a shared drive keep the bytes
    photos(store, [f"blob{i}" + ".jpg" for i in range(3)])
    col = tmp_path / "col"
    (col / "photos").mkdir(parents=True)
    for i in range(3):
        os.symlink(store / f"blob{i}.jpg", col / "photos" / f"x{i}.jpg")
    (tmp_path / "secret.jpg").write_bytes((store / "blob0.jpg").read_bytes())
    jsonl(col / "pairs.jsonl", [{"image": f"photos/x{i}.jpg", "captions": [f"photo {i}"]} for i in range(3)]
          + [{"image": "../secret.jpg", "captions": ["outside"]},
             {"image": str(tmp_path / "secret.jpg"), "captions": ["absolute"]}])
    m = build(config(col, col / "pairs.jsonl", tmp_path / "idx", tiny_checkpoint))
    assert m.counts["images"] == 3 and m.counts["captions"] == 3
    con = sqlite3.connect(tmp_path / "idx" / "meta.sqlite")
    assert sorted(r[0] for r in con.execute("SELECT path FROM items WHERE kind='image'")) == [
        "photos/x0.jpg", "photos/x1.jpg", "photos/x2.jpg"]  # the names as written, not the link targets
    report = {p["path"]: p for p in json.loads((tmp_path / "idx" / "build_report.json").read_text())["problems"]}
    assert report["../secret.jpg"]["reason"] == "outside the images folder"  # the traversal guard still holds
    assert "absolute path" in report[str(tmp_path / "secret.jpg")]["reason"]
    # no captions file: a linked folder (DVC-style) is walked like a real one, a link loop only once
    os.symlink(store, col / "linked")
    os.symlink(col, col / "photos" / "loop")
    assert [e.path for e in read_source(col).entries] == [
        "linked/blob0.jpg", "linked/blob1.jpg", "linked/blob2.jpg", "photos/x0.jpg", "photos/x1.jpg", "photos/x2.jpg"]


# ------------------------------------------------------------------ issue 13 item 2: which folder
def test_captions_paths_are_read_relative_to_the_captions_file(tmp_path, tiny_checkpoint):
    col = tmp_path / "flickr"  # the layout of ../shared/data/flickr8k
    photos(col / "images", [f"{i}.jpg" for i in range(4)])
    jsonl(col / "pairs.jsonl", [{"image": f"images/{i}.jpg", "captions": [f"cap {i}a", f"cap {i}b"]}
                                for i in range(4)])
    src = read_source(col / "images", col / "pairs.jsonl")  # --images is the images folder itself
    assert [e.path for e in src.entries] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert [len(e.captions) for e in src.entries] == [2, 2, 2, 2] and src.missing == []
    m = build(config(col / "images", col / "pairs.jsonl", tmp_path / "idx", tiny_checkpoint))
    assert m.counts["images"] == 4 and m.counts["captions"] == 8 and m.build["missing"] == 0
    # COCO-style: the captions file lives elsewhere and names files relative to --images
    coco = tmp_path / "annotations" / "captions.json"
    coco.parent.mkdir()
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "2.jpg"}],
                                "annotations": [{"image_id": 7, "caption": "from coco"}]}))
    src = read_source(col / "images", coco)
    assert src.entries[0].path == "2.jpg" and src.entries[0].captions == ["from coco"]


def test_flickr8k_indexed_from_its_images_folder_keeps_every_caption(flickr8k):
    """The reported case: --images flickr8k/images --captions flickr8k/pairs.jsonl gave 0 captions."""
    src = read_source(flickr8k / "images", flickr8k / "pairs.jsonl", split="test")
    assert len(src.entries) == 1000 and sum(len(e.captions) for e in src.entries) == 5000 and src.missing == []
    assert all("/" not in e.path for e in src.entries)  # relative to --images: '1000268201_693b08cb0e.jpg'


def test_a_captions_file_whose_images_are_mostly_missing_stops_the_build(tmp_path, tiny_checkpoint, capsys):
    col = tmp_path / "col"
    photos(col / "images", [f"{i}.jpg" for i in range(5)])
    jsonl(col / "pairs.jsonl", [{"image": f"pics/{i}.jpg", "captions": ["x"]} for i in range(5)])  # wrong folder
    args = ["build", "--images", str(col / "images"), "--captions", str(col / "pairs.jsonl"), "--out",
            str(tmp_path / "idx"), "--checkpoint", str(tiny_checkpoint), "--workers", "0", "--quiet"]
    line = one_line_error(*run_cli(args, capsys))
    assert "5 of the 5 images" in line and "pics/0.jpg, pics/1.jpg, pics/2.jpg" in line
    assert str(col / "images") in line and "--allow-missing" in line
    assert not (tmp_path / "idx").exists()
    code, _ = run_cli(args + ["--allow-missing"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "idx" / "build_report.json").read_text())["summary"]["missing"] == 5
    # a few missing images are a report, not a failure
    jsonl(col / "few.jsonl", [{"image": f"images/{i}.jpg", "captions": ["y"]} for i in range(5)]
          + [{"image": "images/gone.jpg", "captions": ["z"]}])
    src = read_source(col / "images", col / "few.jsonl")
    assert len(src.entries) == 5 and [m["path"] for m in src.missing] == ["images/gone.jpg"]


# ------------------------------------------------------------------ issue 18 item 5: one name per file
def test_names_are_normalised_so_one_file_is_one_entry(tmp_path):
    root = tmp_path / "c"
    photos(root, ["x.jpg", "sub/y.jpg"])
    jsonl(root / "pairs.jsonl", [{"image": "sub/../x.jpg", "captions": ["first"]},
                                 {"image": "./x.jpg", "captions": ["second"]},
                                 {"image": "sub\\y.jpg", "captions": ["third"]}])
    src = read_source(root, root / "pairs.jsonl")
    assert [(e.path, e.captions) for e in src.entries] == [("x.jpg", ["first", "second"]), ("sub/y.jpg", ["third"])]
    assert src.missing == []


def test_input_errors_name_the_file_the_line_and_the_problem(tmp_path, capsys):
    root = tmp_path / "c"
    photos(root, ["a.jpg", "b.jpg"])
    coco = root / "caps.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2}], "annotations": []}))
    with pytest.raises(InputError, match=r"caps.json: images\[1\] has no 'file_name' field \(its id is 2\)"):
        read_source(root, coco)
    bad = root / "pairs.jsonl"
    bad.write_text('{"image": "a.jpg", "captions": ["ok"]}\n{"image": "b.jpg", "captions": ["x"],}\n'
                   '{"captions": ["no image"]}\n')
    with pytest.raises(InputError, match=r"pairs.jsonl:2: JSON syntax error at column \d+: .*--skip-bad-lines"):
        read_source(root, bad)
    src = read_source(root, bad, skip_bad_lines=True)
    assert [e.path for e in src.entries] == ["a.jpg", "b.jpg"]  # b.jpg still indexed, uncaptioned
    assert [b["path"] for b in src.bad_lines] == ["pairs.jsonl:2", "pairs.jsonl:3"]
    assert "no 'image' field" in src.bad_lines[1]["reason"]
    csvf = root / "caps.csv"
    csvf.write_bytes("image,caption\na.jpg,caf\u00e9 ok\n".encode() + b"b.jpg,caf\xe9 latin-1\n")
    with pytest.raises(InputError, match=r"caps.csv:3: not UTF-8 text \(byte 0xe9"):
        read_source(root, csvf)
    with pytest.raises(InputError, match="--images .*: no such folder"):
        read_source(tmp_path / "nope")
    with pytest.raises(InputError, match="--id-field photo_id: no image in"):
        read_source(root, _good_jsonl(root), id_field="photo_id")


def _good_jsonl(root: Path) -> Path:
    return jsonl(root / "good.jsonl", [{"image": "a.jpg", "captions": ["ok"], "id": "A"}])


# ------------------------------------------------------------------ issue 18 item 4: nothing usable
def test_a_build_with_no_readable_image_fails(tmp_path, tiny_checkpoint, capsys):
    col = tmp_path / "col"
    col.mkdir()
    for i in range(3):
        (col / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    args = ["build", "--images", str(col), "--out", str(tmp_path / "idx"), "--checkpoint", str(tiny_checkpoint),
            "--workers", "0", "--quiet"]
    line = one_line_error(*run_cli(args, capsys))
    assert "no usable image" in line and "all 3 file(s)" in line and "broken0.jpg" in line
    assert not (tmp_path / "idx").exists() and not (tmp_path / "idx.partial").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(*run_cli(["build", "--images", str(empty), "--out", str(tmp_path / "idx2"),
                                    "--checkpoint", str(tiny_checkpoint), "--quiet"], capsys))
    assert "no images to index" in line


# ------------------------------------------------------------------ issue 18 item 5: add, one path rule
def test_add_stores_paths_relative_to_the_images_folder_like_build(tmp_path, tiny_checkpoint):
    from indexer.maintain import add, remove
    from indexer.searcher import Searcher

    col = tmp_path / "col"
    photos(col, ["a.jpg", "b.jpg"])
    out = tmp_path / "idx"
    build(config(col, None, out, tiny_checkpoint))
    elsewhere = tmp_path / "new_photos"
    photos(elsewhere, ["c.jpg", "d.jpg"], seed=3)
    with pytest.raises(BuildError, match="outside the index's images folder .*link the new folder into it"):
        add(out, images=str(elsewhere), workers=0, progress=False)
    os.symlink(elsewhere, col / "new")  # linked into the collection: added under its name there
    m = add(out, images=str(col / "new"), workers=0, progress=False)
    assert m.counts["images"] == 4
    s = Searcher(out)
    con = sqlite3.connect(out / "meta.sqlite")
    assert sorted(r[0] for r in con.execute("SELECT path FROM items WHERE kind='image'")) == [
        "a.jpg", "b.jpg", "new/c.jpg", "new/d.jpg"]
    assert s.image_path(s.item_by_path("new/c.jpg")["id"]).read_bytes() == (elsewhere / "c.jpg").read_bytes()
    (elsewhere / "e.jpg").write_bytes(b"broken")
    with pytest.raises(BuildError, match="nothing added: none of the 1 new file"):
        add(out, images=str(col / "new"), workers=0, progress=False)
    assert Searcher(out).manifest.counts["images"] == 4  # unchanged
    assert remove(out, paths=["new/sub/../c.jpg"]) == {"images": 1, "captions": 0}  # names normalised here too


# ------------------------------------------------------------------ every CLI failure: one line, no traceback
def test_indexer_cli_failure_modes_say_what_went_wrong(tmp_path, tiny_checkpoint, capsys):
    import shutil

    col = tmp_path / "col"
    photos(col / "images", ["a.jpg", "b.jpg"])
    jsonl(col / "pairs.jsonl", [{"image": "images/a.jpg", "captions": ["a red dog"]},
                                {"image": "images/b.jpg", "captions": ["a blue cat"]}])
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    base = ["--checkpoint", str(ckpt), "--workers", "0", "--quiet"]

    def fails(args: list[str], *needles: str) -> None:
        line = one_line_error(*run_cli(args, capsys))
        for n in needles:
            assert n in line, line

    fails(["build", "--images", str(tmp_path / "wrong"), "--out", str(tmp_path / "x")] + base, "no such folder")
    fails(["build", "--images", str(col / "pairs.jsonl"), "--out", str(tmp_path / "x")] + base, "not a folder")
    (tmp_path / "empty").mkdir()
    fails(["build", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "x")] + base, "no images to index")
    (col / "bad.jsonl").write_text('{"image": "images/a.jpg"}\n{"image": "images/b.jpg"\n')
    fails(["build", "--images", str(col), "--captions", str(col / "bad.jsonl"), "--out", str(tmp_path / "x")] + base,
          "bad.jsonl:2: JSON syntax error")
    broken = tmp_path / "broken_ckpt"
    broken.mkdir()
    shutil.copy(ckpt / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    fails(["build", "--images", str(col), "--out", str(tmp_path / "x"), "--checkpoint", str(broken), "--quiet"],
          "cannot load checkpoint")
    assert run_cli(["build", "--images", str(col), "--captions", str(col / "pairs.jsonl"), "--out",
                    str(tmp_path / "idx")] + base, capsys)[0] == 0
    fails(["search", str(tmp_path / "idx"), "--text", "dog", "--filters", "split=test"], "--filters is not JSON")
    fails(["search", str(tmp_path / "idx"), "--image", str(col / "pairs.jsonl")], "pairs.jsonl: not a readable image")
    from conftest import make_tiny_checkpoint

    make_tiny_checkpoint(ckpt, seed=7)  # the checkpoint the index names is now another model
    fails(["search", str(tmp_path / "idx"), "--text", "red dog"], "built with checkpoint")
    fails(["add", str(tmp_path / "idx"), "--images", str(col / "images"), "--workers", "0", "--quiet"],
          "built with checkpoint")
    fails(["search", str(tmp_path / "col"), "--text", "red dog"], "not an index")
