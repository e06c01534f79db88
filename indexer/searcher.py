"""`Searcher`: the one search engine over an index directory (service, CLI and evaluation).

Two stages: FAISS over the global vectors returns K candidates (filters and tombstones applied
inside FAISS through ID selectors, so a selective filter still yields K real candidates); then
the candidates' token blocks are gathered from the memory-mapped token store, scored with the
encoder's MrSw kernel and fused with the exact global score. Scores always come from the
same `encoder.similarity` functions training and evaluation use.
"""
from __future__ import annotations

import posixpath
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoder.confidence import calibration, confidence
from encoder.config import ScoreConfig
from encoder.model import CheckpointError, checkpoint_digest
from encoder.pipeline import Encoder
from encoder.ranking import order, stage_two
from encoder.similarity import local_from_flat, word_alignment
from encoder.words import is_content

from . import faiss_index, metadata
from .info import index_info
from .inputs import relative_inside
from .manifest import CODEC, FAISS, META, IndexFormatError, Manifest, read_manifest
from .results import Hit, SearchError, SearchResult
from .tokenstore import KINDS, Segment, TokenCodec, gather_rows, pad_blocks

MODES = ("rerank", "global")
TARGETS = {"images": "image", "captions": "caption"}


@dataclass
class Gathered:
    """Stored vectors of some items of one kind: exact globals and decoded, padded tokens."""

    global_: np.ndarray  # [K, D]
    tokens: np.ndarray  # [K, S, D]
    mask: np.ndarray  # [K, S]


class _KindTable:
    """Per kind: sorted ids -> (segment, position), live flags; the FAISS gallery."""

    def __init__(self, con, kind: str):
        rows = con.execute("SELECT id, segment, pos, deleted FROM items WHERE kind=? ORDER BY id", (kind,)).fetchall()
        arr = np.array([tuple(r) for r in rows], dtype=np.int64).reshape(-1, 4)
        self.ids, self.seg, self.pos, deleted = arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3].astype(bool)
        self.deleted_ids = self.ids[deleted]
        self.live_ids = self.ids[~deleted]
        # ids 0..n-1 (a fresh build): an id is its own row, no binary search over a large table
        # (each step a cache miss: a visible share of a re-rank on a 1M-image index)
        self.dense = len(self.ids) == 0 or (int(self.ids[0]) == 0 and int(self.ids[-1]) == len(self.ids) - 1)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.dense:
            if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(self.ids)):
                raise KeyError("unknown item id")
            return self.seg[ids], self.pos[ids]
        at = np.searchsorted(self.ids, ids)
        if len(ids) and (at.max() >= len(self.ids) or not np.array_equal(self.ids[at], ids)):
            raise KeyError("unknown item id")
        return self.seg[at], self.pos[at]


def text_words(encoder, text: str) -> list[str]:
    """The word (piece) strings behind each text token the encoder produces for `text`."""
    tb = encoder.text_backbone
    max_tokens = int(getattr(tb, "max_tokens", 32))
    tok = getattr(tb, "tokenizer", None)
    if tok is None:  # tiny-text: lower-cased whitespace words
        return text.lower().split()[:max_tokens] or [""]
    enc = tok(text, truncation=True, max_length=max_tokens + 2, return_special_tokens_mask=True)
    ids = [i for i, s in zip(enc["input_ids"], enc["special_tokens_mask"]) if not s]
    return tok.convert_ids_to_tokens(ids)[:max_tokens] or [""]


def encode_text_query(encoder, query: str, explain: bool = False) -> tuple:
    """(embedding, the words behind its tokens when `explain`, seconds) of one text query."""
    if not isinstance(query, str) or not query.strip():
        raise SearchError("the query text is empty")
    t0 = time.perf_counter()
    emb = encoder.encode_texts([query])
    words = text_words(encoder, query) if explain else None
    return emb, words, time.perf_counter() - t0


class IndexStore:
    """Everything an index directory holds, opened for reading, without an encoder."""

    def __init__(self, index_dir: str | Path):
        self.index_dir = Path(index_dir)
        self.manifest: Manifest = read_manifest(self.index_dir)
        m = self.manifest
        self._local = threading.local()
        con = self._con()
        self.metadata_fields: set[str] = metadata.field_names(con)
        self.has_user_ids = metadata.has_user_id(con)  # False for an index built before user ids
        self.tables = {k: _KindTable(con, k) for k in KINDS}
        self.segments = [Segment(self.index_dir / s) for s in m.segments]
        self.codecs = {k: TokenCodec.load(m.token_form, m.tokens_dim, self.index_dir / CODEC[k]) for k in KINDS}
        self.faiss = {k: faiss_index.load(self.index_dir / FAISS[k], mmap=True) for k in KINDS}
        self.faiss_gpu = {k: faiss_index.to_gpu(v) for k, v in self.faiss.items()}
        self.grid = tuple(m.grid)
        self.info = index_info(self.index_dir, m, faiss_ntotal={k: int(v.ntotal) for k, v in self.faiss.items()})

    def score_config(self):
        return ScoreConfig.model_validate(self.manifest.model.get("score", {}))

    # ------------------------------------------------------------------ storage access
    def _con(self):
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = metadata.connect(self.index_dir / META, readonly=True)
        return con

    def gather(self, kind: str, ids: np.ndarray) -> Gathered:
        """Exact global vectors and decoded token blocks of `ids` (in that order)."""
        ids = np.asarray(ids, dtype=np.int64)
        seg_of, pos = self.tables[kind].locate(ids)
        D = self.manifest.tokens_dim
        glob = np.zeros((len(ids), self.manifest.dim), np.float32)
        lengths = np.zeros(len(ids), np.int64)
        blocks: list[tuple[np.ndarray, np.ndarray]] = []
        for s in np.unique(seg_of):
            sel = np.nonzero(seg_of == s)[0]
            data = self.segments[int(s)].kinds[kind]
            p = pos[sel]
            glob[sel] = data["global"][p]
            codes, lens = gather_rows(data["rows"], data["offsets"][p], data["lengths"][p])
            lengths[sel] = lens
            blocks.append((sel, self.codecs[kind].decode(codes)))
        if len(blocks) == 1 and np.array_equal(blocks[0][0], np.arange(len(ids))):
            flat = blocks[0][1]
        else:  # several segments: put the blocks back in request order
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            flat = np.zeros((int(lengths.sum()), D), np.float32)
            for sel, dec in blocks:
                idx = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in sel]) if len(sel) else []
                flat[idx] = dec
        tokens, mask = pad_blocks(flat, lengths)
        return Gathered(glob, tokens, mask)

    # ------------------------------------------------------------------ the Gallery of encoder.ranking
    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def tokens_dim(self) -> int:
        return self.manifest.tokens_dim

    def allowed(self, kind: str, filters: dict | None) -> np.ndarray | None:
        """Ids of `kind` a metadata filter lets through (None: no filter)."""
        if not filters:
            return None
        try:
            return np.array(metadata.matching_ids(self._con(), kind, filters, self.metadata_fields), np.int64)
        except metadata.FilterError as e:
            raise SearchError(str(e)) from None

    def stage_one(self, kind: str, queries: np.ndarray, k: int, allow: np.ndarray | None = None) -> np.ndarray:
        """FAISS top-k ids, filters and tombstones applied inside FAISS (ID selectors), so a
        selective filter still yields k real candidates."""
        deny = self.tables[kind].deleted_ids
        deny = deny if len(deny) else None
        index = self.faiss[kind] if (allow is not None or deny is not None) else self.faiss_gpu[kind]
        _, ids = faiss_index.search(index, queries, k, self.manifest.faiss[kind], allow=allow, deny=deny)
        return ids

    def globals(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """The exact stored global vectors [n, D] of `ids`."""
        seg_of, pos = self.tables[kind].locate(np.asarray(ids, np.int64))
        out = np.zeros((len(ids), self.manifest.dim), np.float32)
        for s in np.unique(seg_of):
            sel = seg_of == s
            out[sel] = self.segments[int(s)].kinds[kind]["global"][pos[sel]]
        return out

    def global_scores(self, kind: str, queries: torch.Tensor, ids: np.ndarray, rows_per_step: int = 2**16
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exact scores from the stored vectors (FAISS's may be approximate: IVF-PQ), and the
        label route's part (its columns past `tokens_dim`), many queries per gather."""
        Q, K = ids.shape
        Dt = self.tokens_dim
        glob = torch.empty(Q, K)
        label = torch.empty(Q, K) if self.dim > Dt else None
        step = max(1, rows_per_step // max(1, K))
        for s in range(0, Q, step):
            vec = torch.from_numpy(self.globals(kind, ids[s:s + step].reshape(-1))).view(-1, K, self.dim)
            glob[s:s + step] = torch.einsum("qkd,qd->qk", vec, queries[s:s + step])
            if label is not None:
                label[s:s + step] = torch.einsum("qkd,qd->qk", vec[..., Dt:], queries[s:s + step, Dt:])
        return glob, label

    def local_scores(self, kind: str, ids: np.ndarray, qt: torch.Tensor, qm: torch.Tensor,
                     query_is_text: bool, reduce: str) -> torch.Tensor:
        """MrSw of each query qt [Q, T, D] against its candidates ids [Q, K] (valid first, then -1)."""
        out = torch.zeros(ids.shape)
        for r in range(ids.shape[0]):
            n = int((ids[r] >= 0).sum())
            if n:
                out[r, :n] = self.query_local_scores(kind, ids[r, :n], qt[r], qm[r], query_is_text, reduce)
        return out

    def query_local_scores(self, kind: str, ids: np.ndarray, qt: torch.Tensor, qm: torch.Tensor,
                           query_is_text: bool, reduce: str) -> torch.Tensor:
        """MrSw of one query [T, D] against each of `ids`, scored from the stored rows.

        The stored codes go straight into one GEMM per segment (`TokenCodec.scores`) and MrSw
        is taken over the flat score matrix: no decoded, padded [K, S, D] candidate block.
        """
        seg_of, pos = self.tables[kind].locate(np.asarray(ids, np.int64))
        out = torch.zeros(len(ids))
        for s in np.unique(seg_of):
            sel = np.nonzero(seg_of == s)[0]
            data = self.segments[int(s)].kinds[kind]
            p = pos[sel]
            codes, lens = gather_rows(data["rows"], data["offsets"][p], data["lengths"][p])
            sim = self.codecs[kind].scores(qt, codes)
            out[torch.from_numpy(sel)] = local_from_flat(sim, qm, torch.from_numpy(lens), query_is_text, reduce)
        return out


class Searcher(IndexStore):
    def __init__(self, index_dir: str | Path, encoder=None, device: str | None = None, check_model: bool = True):
        super().__init__(index_dir)
        m = self.manifest
        if encoder is None:
            try:
                if check_model and checkpoint_digest(m.checkpoint) != m.checkpoint_digest:
                    raise IndexFormatError(f"{self.index_dir} was built with checkpoint {m.checkpoint_digest[:12]}, "
                                           f"but {m.checkpoint or 'the default model'} is a different one: rebuild "
                                           f"the index with `indexer build` (or serve it with the checkpoint it was "
                                           f"built with)")
                encoder = Encoder.from_pretrained(m.checkpoint, device=device)
            except (CheckpointError, FileNotFoundError) as e:
                raise IndexFormatError(f"cannot load the index's encoder: {e}") from None
        self.encoder = encoder
        if encoder.dim != m.dim:
            raise IndexFormatError(f"encoder dim {encoder.dim} != index dim {m.dim}: the index was built by "
                                   f"another model; rebuild it with `indexer build`")
        self.score = encoder.score_config
        self._rerank_cost: float | None = None

    # ------------------------------------------------------------------ search
    def search_text(self, query: str, k: int = 10, candidates: int = 100, mode: str = "rerank",
                    filters: dict | None = None, explain: bool = False) -> SearchResult:
        emb, words, enc_s = encode_text_query(self.encoder, query, explain)
        return self.search_embeddings(emb, "text", "images", k, candidates, mode, filters, explain, words,
                                      encode_seconds=enc_s)

    def search_image(self, image: Image.Image, k: int = 10, candidates: int = 100, mode: str = "rerank",
                     filters: dict | None = None, target: str = "captions", explain: bool = False) -> SearchResult:
        t0 = time.perf_counter()
        emb = self.encoder.encode_images([image])
        enc_s = time.perf_counter() - t0
        return self.search_embeddings(emb, "image", target, k, candidates, mode, filters, explain,
                                      encode_seconds=enc_s)

    def search_embeddings(self, query, query_kind: str, target: str, k: int = 10, candidates: int = 100,
                          mode: str = "rerank", filters: dict | None = None, explain: bool = False,
                          words: list[str] | None = None, encode_seconds: float = 0.0,
                          hydrate: int | None = None) -> SearchResult:
        """Search from a precomputed single-item `Embeddings` query (`query_kind` "text"/"image").

        Image->image has no calibrated local score (the fusion statistics are for caption-image
        pairs), so it ranks by the global score whatever the mode, and its hits carry no confidence.
        `hydrate`: only the first `hydrate` hits get their item fields (path, caption, metadata);
        the rest carry ids and scores (`fill` completes them): a shard asked for its whole
        candidate list returns it cheaply (`service.ray_backend`).
        """
        t_start = time.perf_counter()
        kind = self._target_kind(query_kind, target, k, candidates, mode)
        cross = (query_kind == "text") != (kind == "caption")
        rerank = mode == "rerank" and cross
        timings = {"encode": encode_seconds}
        t0 = time.perf_counter()
        allow = self.allowed(kind, filters)
        if (allow is not None and len(allow) == 0) or len(self.tables[kind].live_ids) == 0:
            timings.update(faiss=time.perf_counter() - t0, rerank=0.0)
            timings["total"] = encode_seconds + time.perf_counter() - t_start
            return SearchResult([], timings, 0)
        depth = max(k, candidates) if rerank else k
        ids = self.stage_one(kind, query.global_.reshape(1, -1).float().cpu().numpy(), depth, allow)
        timings["faiss"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = stage_two(self, query[:1], query_kind == "text", kind, ids, rerank, self.score.local_reduce)
        r = order(found, self.score, k)
        timings["rerank"] = time.perf_counter() - t0
        n = int((r.ids[0] >= 0).sum())
        conf = self.confidences(r.score[0, :n], "rerank" if rerank else "global") if cross else None
        part = lambda t: None if t is None else t[0, :n]  # noqa: E731
        hits = self._hits(kind, r.ids[0, :n], r.score[0, :n], r.global_[0, :n], part(r.local), conf, part(r.label),
                          None if explain else hydrate)  # (an explained caption hit needs its text)
        if explain and hits:
            self._explain(hits, query, query_kind, kind, words)
        timings["total"] = encode_seconds + time.perf_counter() - t_start
        return SearchResult(hits, timings, int(r.counts[0]))

    def _target_kind(self, query_kind: str, target: str, k: int, candidates: int, mode: str) -> str:
        if mode not in MODES:
            raise SearchError(f"mode must be one of {MODES}, not {mode!r}")
        if target not in TARGETS:
            raise SearchError(f"target must be 'images' or 'captions', not {target!r}")
        if query_kind not in ("text", "image"):
            raise SearchError("query_kind must be 'text' or 'image'")
        if k < 1 or candidates < 1:
            raise SearchError("k and candidates must be >= 1")
        return TARGETS[target]

    def confidences(self, scores: torch.Tensor, mode: str) -> torch.Tensor | None:
        """Calibrated confidence of final scores of a caption-image search in `mode`, or None
        when the checkpoint has no calibration for it."""
        return confidence(scores, calibration(self.score, mode))

    def _hits(self, kind, ids, final, gscore, local, conf=None, label=None, hydrate: int | None = None) -> list[Hit]:
        hits = [Hit(id=int(i), score=float(final[j]), global_score=float(gscore[j]),
                    local_score=None if local is None else float(local[j]), kind=kind,
                    confidence=None if conf is None else float(conf[j]),
                    label_score=None if label is None else float(label[j])) for j, i in enumerate(ids)]
        if hydrate is None:
            return self.fill(hits)
        return self.fill(hits[:hydrate]) + hits[hydrate:]

    def fill(self, hits: list[Hit]) -> list[Hit]:
        """`hits` with their item fields (path, caption, metadata, image and user ids) read from
        the metadata store, in place."""
        rows = self._items([h.id for h in hits]) if hits else {}
        for h in hits:
            d = rows.get(h.id, {})
            h.metadata, h.path, h.caption = d.get("metadata", {}), d.get("path"), d.get("caption")
            h.image_id, h.user_id = d.get("image_id"), d.get("user_id")
        return hits

    def _items(self, ids: list[int], live_only: bool = False) -> dict[int, dict]:
        """Item dicts by id; a caption carries its image's metadata, path and user id; every path
        is collection-relative (`public_path`)."""
        con = self._con()
        q = ",".join("?" * len(ids))
        live = " AND deleted=0" if live_only else ""
        rows = {r["id"]: metadata.item_dict(r) for r in con.execute(f"SELECT * FROM items WHERE id IN ({q}){live}", ids)}
        img_ids = sorted({d["image_id"] for d in rows.values() if d["kind"] == "caption"})
        if img_ids:
            q2 = ",".join("?" * len(img_ids))
            images = {r["id"]: metadata.item_dict(r) for r in
                      con.execute(f"SELECT * FROM items WHERE id IN ({q2})", img_ids)}
            for d in rows.values():
                if d["kind"] == "caption":
                    im = images.get(d["image_id"], {})
                    d.update(metadata=im.get("metadata", {}), path=im.get("path"), user_id=im.get("user_id"))
        for d in rows.values():
            d["path"] = self.public_path(d.get("path"))
        return rows

    def public_path(self, stored: str | None) -> str | None:
        """A stored image path as clients may see it: relative to the images folder, never a
        server path (an index from before one-rule paths may hold absolute ones: relativised
        when they lie inside the images folder, else withheld)."""
        if stored is None or not Path(stored).is_absolute():
            return stored
        return relative_inside(stored, ".", self.manifest.images_root)

    def _explain(self, hits, query, query_kind, kind, words) -> None:
        """Per hit, every caption word's best image cell (row/col in the grid) and its score."""
        gw = self.grid[1]
        qt = query.tokens.reshape(-1, query.tokens.shape[-1]).float().cpu()
        qm = query.mask.reshape(-1).cpu()
        g = self.gather(kind, np.array([h.id for h in hits], np.int64))
        for j, h in enumerate(hits):
            ct, cm = torch.from_numpy(g.tokens[j]), torch.from_numpy(g.mask[j])
            if query_kind == "text" and kind == "image":
                idx, sc = word_alignment(qt, qm, ct[None], cm[None])
                w = words or []
            elif query_kind == "image" and kind == "caption":
                idx, sc = word_alignment(ct, cm, qt[None], qm[None])
                w = text_words(self.encoder, h.caption or "")
                if self.score.word_mask != "none":  # the stored caption tokens are content words only
                    w = [x for x in w if is_content(x)]
            else:
                continue
            # positions the word mask dropped (function words, punctuation) have no cell
            kept = [t for t in range(idx.shape[1]) if int(idx[0, t]) >= 0]
            w = list(w) + [""] * idx.shape[1]
            h.alignment = [{"word": w[t], "content": is_content(w[t]), "cell": int(idx[0, t]),
                            "row": int(idx[0, t]) // gw, "col": int(idx[0, t]) % gw,
                            "score": round(float(sc[0, t]), 4)} for t in kept]

    # ------------------------------------------------------------------ items
    def item(self, id: int) -> dict | None:
        """A live item; an image's dict lists its live captions."""
        d = self._items([int(id)], live_only=True).get(int(id))
        if d is not None and d["kind"] == "image":
            d["captions"] = [r[0] for r in self._con().execute(
                "SELECT caption FROM items WHERE image_id=? AND kind='caption' AND deleted=0 ORDER BY id", (int(id),))]
        return d

    def item_by_path(self, path: str) -> dict | None:
        """The live image stored under `path` (relative to the images folder, as hits give it)."""
        name = posixpath.normpath(str(path).strip().replace("\\", "/"))
        r = self._con().execute("SELECT id FROM items WHERE kind='image' AND deleted=0 AND path=? ORDER BY id LIMIT 1",
                                (name,)).fetchone()
        return None if r is None else self.item(r[0])

    def item_by_user_id(self, user_id: str | int) -> dict | None:
        """The live image (the first, by id) whose captions-file id is `user_id` (a string
        also matches an integer id written as that string)."""
        if not self.has_user_ids:
            raise SearchError("this index was built before user ids were stored: rebuild it (indexer build) "
                              "to look images up by their id field")
        keys = [user_id]
        if isinstance(user_id, str) and user_id.strip().lstrip("-").isdigit():
            keys.append(int(user_id))
        q = ",".join("?" * len(keys))
        r = self._con().execute(f"SELECT id FROM items WHERE user_id IN ({q}) AND kind='image' AND deleted=0 "
                                "ORDER BY id LIMIT 1", keys).fetchone()
        return None if r is None else self.item(r[0])

    def image_path(self, id: int) -> Path | None:
        """The file of a live image item: only paths the index itself holds, never a caller's."""
        r = self._con().execute("SELECT path FROM items WHERE id=? AND kind='image' AND deleted=0",
                                (int(id),)).fetchone()
        if r is None:
            return None
        p = (Path(self.manifest.images_root) / r["path"]).resolve()  # stored paths may be absolute (adds)
        return p if p.is_file() else None

    def rerank_cost(self, candidates: int = 100, repeats: int = 5) -> float:
        """Measured seconds per re-ranked candidate (gather + MrSw), cached after the first call."""
        if self._rerank_cost is None:
            ids = self.tables["image"].live_ids
            if len(ids) == 0:
                return 0.0
            rng = np.random.default_rng(0)
            qt = torch.nn.functional.normalize(torch.randn(12, self.manifest.tokens_dim), dim=-1)
            qm = torch.ones(12, dtype=torch.bool)
            times = []
            for _ in range(repeats):
                c = rng.choice(ids, size=min(candidates, len(ids)), replace=False)
                t0 = time.perf_counter()
                self.query_local_scores("image", np.sort(c), qt, qm, True, self.score.local_reduce)
                times.append((time.perf_counter() - t0) / len(c))
            self._rerank_cost = float(np.median(times))
        return self._rerank_cost
