"""Incremental maintenance: `add` (a new segment), `remove` (tombstones), `compact` (rewrite).

Every operation works on a staging copy -- unchanged immutable files (token segments,
codecs) are hard-linked, the small mutable ones (SQLite, FAISS, manifest) copied -- and then
swaps it in with renames, so a reader never sees a half-updated index and a failure leaves the
old index as it was. Adds encode only the new items and add their vectors to the existing FAISS
galleries (IVF lists keep their trained centroids), so they never need a full rebuild.
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

from encoder.model import checkpoint_digest

from . import faiss_index, metadata
from .build import BuildError, build_galleries, encode_into, open_encoder, report_inputs, report_summary
from .config import BuildConfig, FaissParams
from .inputs import read_source, relative_inside
from .manifest import CODEC, FAISS, META, REPORT, Manifest, file_entries, read_manifest, write_manifest
from .searcher import TARGETS, Searcher
from .tokenstore import KINDS, RawKind, Segment, TokenCodec, gather_rows, write_segment

MUTABLE = {META, *FAISS.values(), "manifest.json", REPORT}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _stage(index: Path) -> Path:
    staging = index.with_name(index.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for f in index.iterdir():
        if not f.is_file():
            continue
        if f.name in MUTABLE:
            shutil.copy2(f, staging / f.name)
        else:
            try:
                os.link(f, staging / f.name)
            except OSError:  # filesystems without hard links
                shutil.copy2(f, staging / f.name)
    return staging


def _swap(index: Path, staging: Path) -> None:
    old = index.with_name(f"{index.name}.old-{os.getpid()}")
    os.replace(index, old)
    os.replace(staging, index)
    shutil.rmtree(old, ignore_errors=True)


def _refresh(staging: Path, m: Manifest, changed: list[str]) -> Manifest:
    """Recount from SQLite, re-hash only the files that changed, write the manifest."""
    con = metadata.connect(staging / META)
    counts = {}
    for kind, name in (("image", "images"), ("caption", "captions")):
        total, dead = con.execute("SELECT count(*), coalesce(sum(deleted), 0) FROM items WHERE kind=?",
                                  (kind,)).fetchone()
        counts[name], counts[f"deleted_{name}"] = int(total), int(dead)
    problems = metadata.read_report(con)
    con.close()
    summary = report_summary(problems)
    (staging / REPORT).write_text(json.dumps({"summary": summary, "problems": problems}, indent=2) + "\n")
    files = dict(m.files)
    for name in {*changed, REPORT, META}:
        files.update(file_entries(staging, [name]))
    m = m.model_copy(update={"counts": counts, "files": files, "updated": _now(),
                             "build": {**m.build, **summary}})
    write_manifest(staging, m)
    return m


def add(index: str | Path, images: str, captions: str | None = None, split: str | None = None,
        batch_size: int = 64, workers: int = 1, device: str | None = None, progress: bool = True,
        encoder=None, id_field: str | None = None, allow_missing: bool = False,
        skip_bad_lines: bool = False) -> Manifest:
    """Encode new images (and their captions) into a new segment of an existing index.

    One rule for every stored path, as in `build`: relative to the index's images folder. New
    images must therefore lie inside it (a folder linked into it counts: the link is not
    followed to judge that)."""
    index = Path(index)
    m = read_manifest(index)
    id_field = id_field or m.build.get("id_field")
    source = read_source(images, captions, split, id_field=id_field, allow_missing=allow_missing,
                         skip_bad_lines=skip_bad_lines)
    encoder = encoder or open_encoder(m.checkpoint, device)
    if encoder.dim != m.dim or checkpoint_digest(m.checkpoint) != m.checkpoint_digest:
        raise BuildError(f"{index} was built with checkpoint {m.checkpoint_digest[:12]}; its encoder changed since")
    root = Path(m.images_root)
    prefix = relative_inside(source.root, ".", root)
    if prefix is None:
        raise BuildError(f"--images {source.root} is outside the index's images folder {root}: stored paths are "
                         f"relative to it; move or link the new folder into it, then add it from there")

    def store_path(rel: str) -> str:
        return rel if prefix == "." else f"{prefix}/{rel}"

    staging = _stage(index)
    try:
        con = metadata.connect(staging / META)
        known = {r[0] for r in con.execute("SELECT path FROM items WHERE kind='image' AND deleted=0")}
        fresh = [e for e in source.entries if store_path(e.path) not in known]
        n_entries = len(source.entries)
        for e in source.entries:
            if store_path(e.path) in known:
                metadata.report(con, store_path(e.path), "duplicate", "already in the index (same path)")
        report_inputs(con, source)
        next_id = int(con.execute("SELECT coalesce(max(id), -1) + 1 FROM items").fetchone()[0])
        metadata.set_progress(con, {"position": 0, "raw": {}})
        con.commit()
        con.close()
        source.entries = fresh
        seg_no = len(m.segments)
        seg_name = f"tokens-{seg_no:03d}.h5"
        work = staging / "add.work"
        cfg = BuildConfig(images=str(source.root), captions=captions, out=str(index), tokens=m.token_form,
                          batch_size=batch_size, workers=workers, progress=progress)
        if fresh:
            encode_into(work, cfg, source, encoder, db=staging / META, codec_dir=staging, segment=seg_no,
                        id_base=next_id, store_path=store_path)
            _require_new_images(staging / META, next_id, source.root, len(fresh), n_entries)
        else:
            work.mkdir()
        raws = {k: RawKind.at(work, k) for k in KINDS}
        row_bytes = TokenCodec.load(m.token_form, m.tokens_dim, staging / CODEC["image"]).row_bytes
        counts = write_segment(staging / seg_name, raws, m.token_form, m.tokens_dim, row_bytes, m.dim)
        changed = [seg_name]
        seg = Segment(staging / seg_name)
        for kind in KINDS:
            if counts[kind]:
                idx = faiss_index.load(staging / FAISS[kind])
                faiss_index.add_vectors(idx, seg.kinds[kind]["global"], seg.kinds[kind]["ids"])
                (staging / FAISS[kind]).unlink()  # never write through to the live copy
                faiss_index.save(idx, staging / FAISS[kind])
                changed.append(FAISS[kind])
        del seg
        shutil.rmtree(work)
        changed += [CODEC[k] for k in KINDS if (staging / CODEC[k]).is_file() and CODEC[k] not in m.files]
        m = m.model_copy(update={"segments": [*m.segments, seg_name]})
        m = _refresh(staging, m, changed)
        _swap(index, staging)
        return m
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _require_new_images(db: Path, first_id: int, root: Path, fresh: int, named: int) -> None:
    con = metadata.connect(db, readonly=True)
    try:
        if con.execute("SELECT count(*) FROM items WHERE kind='image' AND id >= ?", (first_id,)).fetchone()[0]:
            return
    finally:
        con.close()
    raise BuildError(f"nothing added: none of the {fresh} new file(s) under {root} could be read "
                     f"(of {named} found); the index is unchanged")


def remove(index: str | Path, ids: list[int] | None = None, paths: list[str] | None = None) -> dict[str, int]:
    """Tombstone images (with their captions) or single captions; FAISS drops them where it can."""
    index = Path(index)
    m = read_manifest(index)
    ids, paths = list(ids or []), list(paths or [])
    if not ids and not paths:
        raise ValueError("nothing to remove: give --ids and/or --paths")
    staging = _stage(index)
    try:
        con = metadata.connect(staging / META)
        unknown = []
        img_ids, cap_ids = set(), set()
        for i in ids:
            r = con.execute("SELECT kind FROM items WHERE id=? AND deleted=0", (int(i),)).fetchone()
            if r is None:
                unknown.append(str(i))
            else:
                (img_ids if r[0] == "image" else cap_ids).add(int(i))
        for p in paths:  # stored paths are normalised: 'sub/../x.jpg' names 'x.jpg'
            rows = con.execute("SELECT id FROM items WHERE kind='image' AND path=? AND deleted=0",
                               (posixpath.normpath(p.replace("\\", "/")),)).fetchall()
            if not rows:
                unknown.append(p)
            img_ids.update(r[0] for r in rows)
        if unknown:
            raise ValueError(f"not in the index (or already removed): {', '.join(unknown[:10])}")
        for i in img_ids:
            cap_ids.update(r[0] for r in con.execute("SELECT id FROM items WHERE image_id=? AND deleted=0", (i,)))
        all_ids = sorted(img_ids | cap_ids)
        con.executemany("UPDATE items SET deleted=1 WHERE id=?", [(i,) for i in all_ids])
        con.commit()
        con.close()
        for kind, chosen in (("image", img_ids), ("caption", cap_ids)):
            if chosen:
                idx = faiss_index.load(staging / FAISS[kind])
                faiss_index.remove_ids(idx, np.array(sorted(chosen), dtype=np.int64))
                faiss_index.save(idx, staging / FAISS[kind])
        _refresh(staging, m, list(FAISS.values()))
        _swap(index, staging)
        return {"images": len(img_ids), "captions": len(cap_ids)}
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def compact(index: str | Path, chunk: int = 4096) -> Manifest:
    """Rewrite live items into one segment (ids unchanged), rebuild FAISS by the `auto` rule."""
    index = Path(index)
    m = read_manifest(index)
    staging = index.with_name(index.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for k in KINDS:
            if (index / CODEC[k]).is_file():
                shutil.copy2(index / CODEC[k], staging / CODEC[k])
        src = metadata.connect(index / META, readonly=True)
        dst = metadata.connect(staging / META)
        segs = [Segment(index / s) for s in m.segments]
        raws = {k: RawKind.at(staging, k) for k in KINDS}
        for kind in KINDS:
            rows = src.execute("SELECT * FROM items WHERE kind=? AND deleted=0 ORDER BY id", (kind,)).fetchall()
            for s in range(0, len(rows), chunk):
                part = rows[s:s + chunk]
                seg_of = np.array([r["segment"] for r in part])
                pos = np.array([r["pos"] for r in part])
                codes, glob, lens = [], [], []
                for i, r in enumerate(part):  # keep id order; consecutive runs share a segment
                    d = segs[int(seg_of[i])].kinds[kind]
                    c, ln = gather_rows(d["rows"], d["offsets"][pos[i:i + 1]], d["lengths"][pos[i:i + 1]])
                    codes.append(c)
                    glob.append(d["global"][pos[i]])
                    lens.append(int(ln[0]))
                raws[kind].append(np.concatenate(codes), np.stack(glob), np.array([r["id"] for r in part]),
                                  np.array(lens, dtype=np.int64), m.token_row_bytes)
                metadata.insert_items(dst, [(r["id"], r["kind"], r["path"], r["caption"], r["image_id"],
                                             json.loads(r["meta"]), r["sha256"], 0, s + j,
                                             r["user_id"] if "user_id" in r.keys() else None)
                                            for j, r in enumerate(part)])
        dst.executemany("INSERT INTO report(path, problem, reason) VALUES (?,?,?)",
                        [tuple(r) for r in src.execute("SELECT path, problem, reason FROM report ORDER BY seq")])
        dst.executemany("INSERT OR IGNORE INTO fields(name) VALUES (?)", [tuple(r) for r in src.execute("SELECT name FROM fields")])
        metadata.set_progress(dst, {"finished": True, "compacted": _now()})
        dst.commit()
        dst.close()
        src.close()
        del segs
        seg_name = "tokens-000.h5"
        write_segment(staging / seg_name, raws, m.token_form, m.tokens_dim, m.token_row_bytes, m.dim)
        for r in raws.values():
            r.remove()
        seg = Segment(staging / seg_name)
        fparams = build_galleries(seg, m.dim, m.build.get("faiss_option", "auto"),
                                  m.build.get("nprobe_recall", 0.99), staging)
        del seg
        files = [seg_name, *FAISS.values(), *[CODEC[k] for k in KINDS if (staging / CODEC[k]).is_file()]]
        m = m.model_copy(update={"segments": [seg_name], "faiss": fparams, "files": file_entries(staging, files)})
        m = _refresh(staging, m, files)
        _swap(index, staging)
        return m
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def tune(index: str | Path, queries: list[str], target: str = "images", recall: float = 0.99,
         k: int = 100) -> FaissParams:
    """Re-pick an IVF gallery's nprobe from real queries (e.g. a query log) and store it.

    A build can only calibrate with the index's own other-modality vectors (none in an
    image-only collection); the queries people actually send are the better sample. Only the
    manifest changes (atomically); a running service picks it up at its next reload.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be 'images' or 'captions', not {target!r}")
    queries = [q for q in queries if q.strip()]
    if len(queries) < 10:
        raise ValueError(f"need at least 10 non-empty queries to measure recall, got {len(queries)}")
    if not 0 < recall <= 1:
        raise ValueError(f"recall must be in (0, 1], not {recall}")
    index = Path(index)
    s = Searcher(index)
    kind = TARGETS[target]
    p = s.manifest.faiss[kind]
    if p.kind not in ("ivf", "ivfpq"):
        raise ValueError(f"the {target} gallery is {p.factory}: only IVF galleries have an nprobe to tune")
    q = np.concatenate([s.encoder.encode_texts(queries[i:i + 256]).global_.float().cpu().numpy()
                        for i in range(0, len(queries), 256)])
    deleted = s.tables[kind].deleted_ids
    blocks = []
    for seg in s.segments:
        vec, ids = seg.kinds[kind]["global"], np.asarray(seg.kinds[kind]["ids"])
        if len(deleted):
            live = ~np.isin(ids, deleted)
            vec, ids = np.asarray(vec)[live], ids[live]
        blocks.append((vec, ids))
    ntotal = sum(len(b[1]) for b in blocks)
    truth = faiss_index.exact_top(blocks, q, min(k, ntotal))
    nlist = faiss.extract_index_ivf(s.faiss[kind]).nlist  # the ceiling: a tune may also raise nprobe
    nprobe, got = faiss_index.calibrate_nprobe(s.faiss[kind], p.model_copy(update={"nprobe": nlist}),
                                              q, truth, target=recall)
    p = p.model_copy(update={"nprobe": nprobe, "recall": round(got, 4)})
    m = read_manifest(index)
    write_manifest(index, m.model_copy(update={"faiss": {**m.faiss, kind: p}}))
    return p

