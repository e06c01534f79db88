"""`indexer build`: stream a collection through the encoder into a new index directory.

decode (DataLoader workers: read bytes, sha256, decode, preprocess) -> encoder.encode_pixels ->
token codec -> append to raw files; captions go through encoder.encode_texts in batches. Each
batch commits its SQLite rows together with the progress record, so memory stays bounded by
one batch and a killed build, re-run with the same command, continues after the last
committed batch. Everything is written into `<out>.partial` and renamed into place at the end,
so `<out>` is either absent or a complete index.

Ids do not depend on batching: image id = position of the image in the input order, caption
id = number of images + ordinal of the caption in that order. A resumed build therefore
produces exactly the ids, rows and vectors of an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from encoder.model import CheckpointError, checkpoint_digest
from encoder.pipeline import Encoder
from encoder.transforms import ImageError, load_image

from . import faiss_index, metadata
from .config import BuildConfig, FaissParams, choose_faiss
from .inputs import Entry, Source, read_source
from .manifest import (CODEC, FAISS, META, REPORT, IndexFormatError, Manifest, file_entries, read_manifest,
                       write_manifest)
from .tokenstore import KINDS, RawKind, Segment, TokenCodec, write_segment

SEGMENT0 = "tokens-000.h5"
PROBLEMS = ("skipped", "duplicate", "missing", "bad_line")  # what build_report.json counts


class BuildError(RuntimeError):
    """A build that cannot start or finish, with a one-line reason for the CLI."""


# ------------------------------------------------------------------ decoding in workers
class _Files(Dataset):
    """Reads, hashes and decodes one image; failures come back as reasons, never exceptions."""

    def __init__(self, root: Path, entries: list[Entry], start: int, preprocess: Callable):
        self.root, self.entries, self.start, self.preprocess = root, entries, start, preprocess

    def __len__(self) -> int:
        return len(self.entries) - self.start

    def __getitem__(self, i: int):
        pos = self.start + i
        try:
            data = (self.root / self.entries[pos].path).read_bytes()
        except OSError as e:
            return pos, None, None, f"unreadable file: {e.strerror or e}"
        sha = hashlib.sha256(data).hexdigest()
        try:
            return pos, sha, self.preprocess(load_image(data)), None
        except ImageError as e:
            return pos, sha, None, str(e)
        except Exception as e:  # a decoder bug on one file must not kill the build
            return pos, sha, None, f"cannot decode: {type(e).__name__}: {e}"


def _collate(items):
    return items


# ------------------------------------------------------------------ one encoded batch
@dataclass
class _Encoded:
    end: int
    ok: list[tuple[int, str]] = field(default_factory=list)  # (entry pos, sha256) in order
    bad: list[tuple[int, str | None, str]] = field(default_factory=list)  # (pos, sha, reason)
    img_global: np.ndarray | None = None
    img_tokens: np.ndarray | None = None  # [b*T, D]
    img_len: np.ndarray | None = None
    cap_items: list[tuple[int, int, str]] = field(default_factory=list)  # (caption ordinal, entry pos, text)
    cap_global: np.ndarray | None = None
    cap_tokens: np.ndarray | None = None
    cap_len: np.ndarray | None = None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def encode_texts_flat(encoder, texts: list[str], batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global [n, D], real tokens concatenated [sum(len), D], lengths [n]) for a list of texts."""
    D, Dt = encoder.dim, encoder.token_dim
    if not texts:
        return np.zeros((0, D), np.float32), np.zeros((0, Dt), np.float32), np.zeros(0, np.int64)
    gs, ts, ls = [], [], []
    for s in range(0, len(texts), batch):
        emb = encoder.encode_texts(texts[s:s + batch])
        mask = emb.mask.cpu()
        gs.append(_np(emb.global_))
        ts.append(_np(emb.tokens.cpu()[mask]))
        ls.append(mask.sum(1).numpy().astype(np.int64))
    return np.concatenate(gs), np.concatenate(ts), np.concatenate(ls)


class _Builder:
    def __init__(self, cfg: BuildConfig, source: Source, encoder, folder: Path, segment: int = 0,
                 id_base: int = 0, store_path: Callable[[str], str] | None = None):
        self.cfg, self.source, self.encoder, self.folder = cfg, source, encoder, folder
        self.segment, self.id_base = segment, id_base
        self.store_path = store_path or (lambda p: p)
        self.entries = source.entries
        n = len(self.entries)
        ncap = np.array([len(e.captions) for e in self.entries], dtype=np.int64)
        self.cap_first = id_base + n + np.concatenate([[0], np.cumsum(ncap)[:-1]]) if n else np.zeros(0, np.int64)
        self.raws = {k: RawKind.at(folder, k) for k in KINDS}
        self.codecs: dict[str, TokenCodec] = {}

    # ---- encoding
    def encode(self, items) -> _Encoded:
        enc = self.encoder
        out = _Encoded(end=items[-1][0] + 1)
        pixels = []
        for pos, sha, px, reason in items:
            if px is None:
                out.bad.append((pos, sha, reason))
            else:
                out.ok.append((pos, sha))
                pixels.append(px)
        D, Dt = enc.dim, enc.token_dim
        if pixels:
            emb = enc.encode_pixels(torch.stack(pixels))
            mask = emb.mask.cpu()
            out.img_global = _np(emb.global_)
            out.img_tokens = _np(emb.tokens.cpu()[mask])
            out.img_len = mask.sum(1).numpy().astype(np.int64)
        else:
            out.img_global, out.img_tokens, out.img_len = (np.zeros((0, D), np.float32),
                                                            np.zeros((0, Dt), np.float32), np.zeros(0, np.int64))
        for pos, _ in out.ok:
            for j, text in enumerate(self.entries[pos].captions):
                out.cap_items.append((int(self.cap_first[pos]) + j, pos, text))
        out.cap_global, out.cap_tokens, out.cap_len = encode_texts_flat(
            enc, [t for _, _, t in out.cap_items], self.cfg.caption_batch)
        return out

    # ---- writing (one SQLite transaction per batch)
    def write(self, con, b: _Encoded, seen: dict[str, tuple[int, str]]) -> None:
        rows = []
        img_keep = np.ones(len(b.ok), dtype=bool)
        owner: dict[int, int] = {}  # entry pos -> image id its captions belong to
        seg_pos = {k: self.raws[k].sizes()["meta"] // 24 for k in KINDS}
        for pos, sha, reason in b.bad:
            metadata.report(con, self.entries[pos].path, "skipped", reason)
        n_img = 0
        for i, (pos, sha) in enumerate(b.ok):
            e = self.entries[pos]
            iid = self.id_base + pos
            if sha in seen:
                img_keep[i] = False
                orig_id, orig_path = seen[sha]
                owner[pos] = orig_id
                metadata.report(con, e.path, "duplicate", f"same content as {orig_path} (id {orig_id}); "
                                f"its {len(e.captions)} caption(s) attach to that image")
                continue
            seen[sha] = (iid, self.store_path(e.path))
            owner[pos] = iid
            rows.append((iid, "image", self.store_path(e.path), None, None, e.meta, sha, self.segment,
                         seg_pos["image"] + n_img, e.user_id))
            metadata.add_fields(con, e.meta)
            n_img += 1
        for j, (cid, pos, text) in enumerate(b.cap_items):
            rows.append((cid, "caption", None, text, owner[pos], None, None, self.segment, seg_pos["caption"] + j))
        # raw token files first, then the transaction that makes them count
        keep_rows = np.repeat(img_keep, b.img_len) if len(b.img_len) else np.zeros(0, bool)
        self.raws["image"].append(self.codecs["image"].encode(b.img_tokens[keep_rows]), b.img_global[img_keep],
                                  np.array([self.id_base + p for (p, _), k in zip(b.ok, img_keep) if k], dtype=np.int64),
                                  b.img_len[img_keep], self.codecs["image"].row_bytes)
        self.raws["caption"].append(self.codecs["caption"].encode(b.cap_tokens), b.cap_global,
                                    np.array([c for c, _, _ in b.cap_items], dtype=np.int64), b.cap_len,
                                    self.codecs["caption"].row_bytes)
        metadata.insert_items(con, rows)
        metadata.set_progress(con, {"position": b.end, "raw": {k: self.raws[k].sizes() for k in KINDS}})
        con.commit()


def _signature(cfg: BuildConfig, source: Source, digest: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cfg.tokens, cfg.faiss, digest, str(Path(cfg.images).resolve())]).encode())
    for e in source.entries:
        h.update(json.dumps([e.path, e.captions, e.meta, e.user_id], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _loader(cfg: BuildConfig, source: Source, start: int, preprocess) -> DataLoader:
    ds = _Files(source.root, source.entries, start, preprocess)
    kw = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=_collate, shuffle=False)
    if cfg.workers > 0:
        kw["prefetch_factor"] = 4
    return DataLoader(ds, **kw)


def codec_ready(builder: _Builder, batches: Iterable[_Encoded], cfg: BuildConfig,
                codec_dir: Path) -> Iterator[_Encoded]:
    """The encoded batches in order, held back only until a lossy codec (pq) has trained on a
    sample of real tokens (the first batches, up to `codec_train_tokens`)."""
    need = any(c.needs_training for c in builder.codecs.values())
    pending: list[_Encoded] = []
    tokens = 0
    for b in batches:
        if not need:
            yield b
            continue
        pending.append(b)
        tokens += len(b.img_tokens)
        if tokens >= cfg.codec_train_tokens:
            _train_codecs(builder, pending, cfg, codec_dir)
            need = False
            yield from pending
            pending = []
    if need:  # the whole collection fitted in the training sample
        _train_codecs(builder, pending, cfg, codec_dir)
        yield from pending


def _train_codecs(builder: _Builder, pending: list[_Encoded], cfg: BuildConfig, codec_dir: Path) -> None:
    for kind in KINDS:
        codec = builder.codecs[kind]
        if not codec.needs_training:
            continue
        parts = [(b.img_tokens if kind == "image" else b.cap_tokens) for b in pending]
        x = np.concatenate(parts) if parts else np.zeros((0, builder.encoder.dim), np.float32)
        if x.shape[0] > cfg.codec_train_tokens:
            x = x[np.random.default_rng(0).choice(x.shape[0], cfg.codec_train_tokens, replace=False)]
        if x.shape[0] < 256:
            if x.shape[0] == 0:
                continue  # nothing of this kind to store (e.g. no captions): the codec is never used
            raise BuildError(f"--tokens {cfg.tokens}: only {x.shape[0]} {kind} token vectors to train the "
                             f"quantiser (needs >= 256); use fp16 or int8 for a collection this small")
        codec.train(x)
        codec.save(codec_dir / CODEC[kind])


def source_of(cfg: BuildConfig) -> Source:
    return read_source(cfg.images, cfg.captions, cfg.split, id_field=cfg.id_field, allow_missing=cfg.allow_missing,
                       skip_bad_lines=cfg.skip_bad_lines)


def open_encoder(checkpoint: str | None, device: str | None):
    try:
        return Encoder.from_pretrained(checkpoint, device=device)
    except CheckpointError as e:
        raise BuildError(str(e)) from None


def encode_into(folder: Path, cfg: BuildConfig, source: Source, encoder,
                on_batch: Callable[[int], None] | None = None, db: Path | None = None, codec_dir: Path | None = None,
                **builder_kw) -> dict:
    """Encode `source` into raw files inside `folder` and rows into the SQLite `db` (default
    folder/meta.sqlite), resuming from the progress recorded there."""
    folder.mkdir(parents=True, exist_ok=True)
    con = metadata.connect(db or folder / META)
    builder = _Builder(cfg, source, encoder, folder, **builder_kw)
    codec_dir = codec_dir or folder
    for kind in KINDS:
        builder.codecs[kind] = TokenCodec.load(cfg.tokens, encoder.token_dim, codec_dir / CODEC[kind])
    prog = metadata.get_progress(con)
    start = int(prog.get("position", 0))
    for kind in KINDS:
        builder.raws[kind].truncate(prog.get("raw", {}).get(kind, {}))
    if start == 0:
        report_inputs(con, source)
    seen = {r["sha256"]: (r["id"], r["path"]) for r in con.execute("SELECT id, path, sha256 FROM items WHERE kind='image' AND deleted=0")}
    n = len(source.entries)
    batches = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=start, unit="img", desc="index", disable=not cfg.progress, smoothing=0.1)

    def encoded() -> Iterator[_Encoded]:
        if start < n:
            for items in _loader(cfg, source, start, encoder.preprocess):
                yield builder.encode(items)
                bar.update(len(items))

    for b in codec_ready(builder, encoded(), cfg, codec_dir):
        builder.write(con, b, seen)
        batches += 1
        if on_batch is not None:
            on_batch(batches)
    bar.close()
    con.close()
    return {"encode_seconds": time.perf_counter() - t0, "batches": batches, "resumed_from": start}


def report_inputs(con, source: Source) -> None:
    """Record what the inputs could not give: missing images, skipped captions lines."""
    for m in source.missing:
        metadata.report(con, m["path"], "missing", m["reason"])
    for b in source.bad_lines:
        metadata.report(con, b["path"], "bad_line", b["reason"])
    con.commit()


def require_images(db: Path, source: Source) -> None:
    """No usable image, no index: the reason instead of an empty index a service would start on."""
    con = metadata.connect(db, readonly=True)
    try:
        n = con.execute("SELECT count(*) FROM items WHERE kind='image'").fetchone()[0]
        if n:
            return
        skipped = con.execute("SELECT path, reason FROM report WHERE problem='skipped' ORDER BY seq LIMIT 3").fetchall()
    finally:
        con.close()
    why = "; ".join(f"{r['path']}: {r['reason']}" for r in skipped)
    raise BuildError(f"no usable image under {source.root}: all {len(source.entries)} file(s) failed to read"
                     + (f" (e.g. {why})" if why else ""))


def build_galleries(seg: Segment, dim: int, option: str, nprobe_recall: float | None,
                    folder: Path, like: Path | None = None) -> dict[str, FaissParams]:
    """One FAISS gallery per kind from a segment's global vectors, saved into `folder`.

    IVF galleries get the smallest nprobe whose recall@100 reaches `nprobe_recall`, measured
    with the other modality's vectors as queries (what the service will search with); without
    them the size rule's nprobe stays. With `like` (an index directory, `BuildConfig.faiss_like`)
    each gallery is that index's trained one refilled, with its parameters.
    """
    fparams: dict[str, FaissParams] = {}
    template = read_manifest(like).faiss if like is not None else None
    for kind in KINDS:
        vec, ids = seg.kinds[kind]["global"], seg.kinds[kind]["ids"]
        if template is not None:
            fparams[kind] = template[kind]
            faiss_index.save(faiss_index.fill_like(like / FAISS[kind], vec, ids), folder / FAISS[kind])
            continue
        p = choose_faiss(len(ids), dim, option if len(ids) else "flat")
        index = faiss_index.build_index(vec, ids, p)
        other = seg.kinds["caption" if kind == "image" else "image"]["global"]
        # only the other modality stands in for real queries: a gallery's own vectors sit much
        # closer to it than a caption does to its image (they would pick 4x too small an nprobe)
        if nprobe_recall is not None and p.kind in ("ivf", "ivfpq") and len(other) >= 32:
            queries = _calibration_queries(other)
            truth = faiss_index.exact_top([(vec, ids)], queries, min(100, len(ids)))
            nprobe, recall = faiss_index.calibrate_nprobe(index, p, queries, truth, target=nprobe_recall)
            p = p.model_copy(update={"nprobe": nprobe, "recall": round(recall, 4)})
        fparams[kind] = p
        faiss_index.save(index, folder / FAISS[kind])
    return fparams


def _calibration_queries(vectors: np.ndarray, n: int = 256, seed: int = 0) -> np.ndarray:
    take = np.sort(np.random.default_rng(seed).choice(len(vectors), size=min(n, len(vectors)), replace=False))
    return np.ascontiguousarray(vectors[take], dtype=np.float32)


def finalize(folder: Path, cfg: BuildConfig, encoder, source_root: Path, checkpoint_digest: str,
             stats: dict) -> Manifest:
    """Raw files -> HDF5 segment, FAISS galleries, report, manifest (all inside `folder`)."""
    codec = TokenCodec.load(cfg.tokens, encoder.token_dim, folder / CODEC["image"])
    raws = {k: RawKind.at(folder, k) for k in KINDS}
    counts = write_segment(folder / SEGMENT0, raws, cfg.tokens, encoder.token_dim, codec.row_bytes, encoder.dim)
    seg = Segment(folder / SEGMENT0)
    like = Path(cfg.faiss_like) if cfg.faiss_like else None
    fparams = build_galleries(seg, encoder.dim, cfg.faiss, cfg.nprobe_recall, folder, like)
    del seg
    con = metadata.connect(folder / META)
    problems = metadata.read_report(con)
    metadata.set_progress(con, {"finished": True})
    con.commit()
    con.close()
    summary = report_summary(problems)
    (folder / REPORT).write_text(json.dumps({"summary": summary, "problems": problems}, indent=2) + "\n")
    files = [META, SEGMENT0, REPORT, *FAISS.values(), *[CODEC[k] for k in KINDS if (folder / CODEC[k]).is_file()]]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    grid = list(encoder.image_backbone.grid)
    m = Manifest(
        created=now, checkpoint=str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None,
        checkpoint_digest=checkpoint_digest, model=encoder.model.config.model_dump(),
        images_root=str(source_root.resolve()), dim=encoder.dim, token_dim=encoder.token_dim, image_tokens=grid[0] * grid[1], grid=grid,
        token_form=cfg.tokens, token_row_bytes=codec.row_bytes, segments=[SEGMENT0], faiss=fparams,
        counts={"images": counts["image"], "captions": counts["caption"], "deleted_images": 0,
                "deleted_captions": 0},
        files=file_entries(folder, files),
        build={**summary, "encode_seconds": round(stats.get("encode_seconds", 0.0), 2),
               "captions_file": cfg.captions, "split": cfg.split, "id_field": cfg.id_field, "faiss_option": cfg.faiss,
               "nprobe_recall": cfg.nprobe_recall, "faiss_like": cfg.faiss_like},
    )
    write_manifest(folder, m)
    return m


def check_faiss_like(cfg: BuildConfig, digest: str, dim: int) -> None:
    """Before any encoding: `faiss_like` must be an index of the same model and width."""
    if not cfg.faiss_like:
        return
    like = Path(cfg.faiss_like)
    try:
        m = read_manifest(like)
    except IndexFormatError as e:
        raise BuildError(f"--faiss-like {like}: {e}") from None
    if m.checkpoint_digest != digest or m.dim != dim:
        raise BuildError(f"--faiss-like {like} was built by another model: its galleries cannot hold this "
                         "build's vectors")
    missing = [FAISS[k] for k in KINDS if not (like / FAISS[k]).is_file()]
    if missing:
        raise BuildError(f"--faiss-like {like}: {', '.join(missing)} missing")


def report_summary(problems: list[dict]) -> dict[str, int]:
    return {k: sum(1 for p in problems if p["problem"] == k) for k in PROBLEMS}


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def publish(part: Path, out: Path) -> None:
    """Swap a finished `<out>.partial` in for `out` (renames only, so readers never see half an
    index) and drop the build-time raw files."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(part, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(part, out)
    for r in (RawKind.at(out, k) for k in KINDS):
        r.remove()


def build(cfg: BuildConfig, encoder=None, on_batch: Callable[[int], None] | None = None) -> Manifest:
    """Build (or resume building) the index `cfg.out`; returns its manifest."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise BuildError(f"{out} already exists; pass --overwrite to replace it")
    source = source_of(cfg)
    encoder = encoder or open_encoder(cfg.checkpoint, cfg.device)
    digest = checkpoint_digest(cfg.checkpoint)
    check_faiss_like(cfg, digest, encoder.dim)
    part = partial_dir(out)
    sig = _signature(cfg, source, digest)
    sig_file, done_marker = part / "build.signature", part / "FINALIZED"
    if part.exists() and (not sig_file.is_file() or sig_file.read_text() != sig):
        shutil.rmtree(part)  # a partial build of something else: start over
    part.mkdir(parents=True, exist_ok=True)
    if not sig_file.is_file():
        sig_file.write_text(sig)
    if not done_marker.is_file():
        stats = encode_into(part, cfg, source, encoder, on_batch)
        try:
            require_images(part / META, source)
        except BuildError:
            shutil.rmtree(part, ignore_errors=True)
            raise
        finalize(part, cfg, encoder, source.root, digest, stats)
        done_marker.write_text("ok\n")
    publish(part, out)
    sig_file = out / sig_file.name
    sig_file.unlink(missing_ok=True)
    (out / done_marker.name).unlink(missing_ok=True)
    return read_manifest(out)
