"""Two-stage ranking: the one search pipeline, batched, over any gallery.

    stage one  gallery.stage_one: top-K ids by the global inner product (FAISS, or exact)
    stage two  exact global scores of the K, MrSw of the query's tokens against theirs
               (`gallery.local_scores`: both galleries end in `similarity.mrsw_from_sim`), `fuse`, a
               stable sort: ties keep stage one's order

`candidates()` runs both stages and keeps the raw parts; `order()` fuses and ranks them. The
service's `Searcher` (one query), `encoder evaluate` (thousands), the end-of-training
calibration (the same candidates re-fused for each alpha) and the benchmarks all go through
these two functions, so what is measured is what is served. A gallery is a built index
(`indexer.searcher.IndexStore`) or a collection held in memory (`MemoryGallery`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .config import ScoreConfig
from .heads import Embeddings
from .similarity import NEG, fuse, mrsw_from_sim, token_extent

KINDS = ("image", "caption")


class Gallery(Protocol):
    """What two-stage ranking needs from a searchable collection of images and captions."""

    dim: int  # global vector width
    tokens_dim: int  # token width; global columns past it are the label route's

    def stage_one(self, kind: str, queries: np.ndarray, k: int, allow: np.ndarray | None = None) -> np.ndarray:
        """[Q, D] global query vectors -> [Q, k] ids of `kind` by global score (-1 where fewer)."""
        ...

    def global_scores(self, kind: str, queries: torch.Tensor, ids: np.ndarray
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exact global scores [Q, K] of each query [Q, D] with its candidates ids [Q, K] (every id
        valid), and the label route's part of them (its columns past `tokens_dim`; None without)."""
        ...

    def local_scores(self, kind: str, ids: np.ndarray, qt: torch.Tensor, qm: torch.Tensor,
                     query_is_text: bool, reduce: str) -> torch.Tensor:
        """MrSw of each query's tokens qt [Q, T, Dt] (mask qm [Q, T]) against its candidates
        ids [Q, K] (valid ids first, then -1) -> [Q, K] (anything past a row's valid ids)."""
        ...


@dataclass
class Candidates:
    """Stage one's K candidates per query and their raw scores (rows padded with id -1)."""

    ids: np.ndarray  # [Q, K] int64
    global_: torch.Tensor  # [Q, K] exact global score
    local: torch.Tensor | None  # [Q, K] MrSw (None: global mode)
    label: torch.Tensor | None  # [Q, K] the label route's part of global_ (None: no route)
    domain: torch.Tensor | None  # [Q] the queries' in-domain-ness (sets each query's re-rank weight)

    @property
    def valid(self) -> np.ndarray:
        return self.ids >= 0


@dataclass
class Ranked:
    """Each query's hits best first: ids [Q, k] (-1 past the last hit) and the score parts."""

    ids: np.ndarray
    score: torch.Tensor
    global_: torch.Tensor
    local: torch.Tensor | None
    label: torch.Tensor | None
    counts: np.ndarray  # [Q] candidates stage one found


def candidates(gallery: Gallery, queries: Embeddings, query_is_text: bool, kind: str, depth: int,
               rerank: bool, reduce: str, allow: np.ndarray | None = None) -> Candidates:
    """Stage one for every query at once, then stage two."""
    ids = gallery.stage_one(kind, queries.global_.float().cpu().numpy(), depth, allow)
    return stage_two(gallery, queries, query_is_text, kind, ids, rerank, reduce)


def stage_two(gallery: Gallery, queries: Embeddings, query_is_text: bool, kind: str, ids: np.ndarray,
              rerank: bool, reduce: str) -> Candidates:
    """Each query's stage-one candidates `ids` [Q, K] (valid ids first, then -1) scored exactly:
    global (and label-route) scores, then MrSw (`gallery.local_scores`)."""
    Q, K = ids.shape
    valid = ids >= 0
    glob, label = torch.full((Q, K), NEG), None
    if valid.any():
        safe = np.where(valid, ids, ids[valid][0])  # padding reads a real row, masked below
        glob, label = gallery.global_scores(kind, queries.global_.float().cpu(), safe)
        glob = glob.masked_fill(torch.from_numpy(~valid), NEG)
        if label is not None:
            label = label.masked_fill(torch.from_numpy(~valid), 0.0)
    local = None
    if rerank and valid.any():
        local = gallery.local_scores(kind, ids, queries.tokens.float().cpu(), queries.mask.cpu(), query_is_text,
                                     reduce).masked_fill(torch.from_numpy(~valid), NEG)
    elif rerank:
        local = torch.full((Q, K), NEG)
    return Candidates(ids, glob, local, label, None if queries.domain is None else queries.domain.cpu())


def order(c: Candidates, score: ScoreConfig, k: int) -> Ranked:
    """Fuse (or keep the global score in global mode) and rank each query's candidates."""
    final = c.global_ if c.local is None else fuse(c.global_, c.local, score, c.domain)
    final = final.masked_fill(torch.from_numpy(~c.valid), float("-inf"))
    k = min(k, c.ids.shape[1])
    at = torch.argsort(final, dim=1, descending=True, stable=True)[:, :k]
    take = lambda t: None if t is None else torch.gather(t, 1, at)  # noqa: E731
    ids = np.take_along_axis(c.ids, at.numpy(), axis=1)
    return Ranked(ids, take(final), take(c.global_), take(c.local), take(c.label), c.valid.sum(1))


def rank(gallery: Gallery, score: ScoreConfig, queries: Embeddings, query_is_text: bool, kind: str, k: int,
         depth: int, rerank: bool, allow: np.ndarray | None = None) -> Ranked:
    """The whole pipeline: top `k` of `depth` stage-one candidates per query."""
    depth = max(k, depth) if rerank else k
    return order(candidates(gallery, queries, query_is_text, kind, depth, rerank, score.local_reduce, allow),
                 score, k)


class MemoryGallery:
    """A collection's embeddings held in memory, searched exactly (`encoder evaluate --data`,
    training's validation and calibration). Ids are positions."""

    def __init__(self, images: Embeddings, captions: Embeddings):
        self.items = {"image": images.to("cpu"), "caption": captions.to("cpu")}
        self.dim = int(images.global_.shape[1])
        self.tokens_dim = int(images.tokens.shape[-1])

    def stage_one(self, kind: str, queries: np.ndarray, k: int, allow: np.ndarray | None = None) -> np.ndarray:
        g = self.items[kind].global_.float()
        s = torch.from_numpy(queries).float() @ g.T
        if allow is not None:
            keep = torch.zeros(g.shape[0], dtype=torch.bool)
            keep[torch.from_numpy(np.asarray(allow, np.int64))] = True
            s = s.masked_fill(~keep, float("-inf"))
        k = min(k, int(s.shape[1]) if allow is None else len(allow))
        vals, top = s.topk(k, dim=1)
        by_id = torch.argsort(top, dim=1)  # equal scores in id order, as a flat FAISS index returns them
        vals, top = vals.gather(1, by_id), top.gather(1, by_id)
        top = top.gather(1, torch.argsort(vals, dim=1, descending=True, stable=True))
        return top.numpy().astype(np.int64)

    def global_scores(self, kind: str, queries: torch.Tensor, ids: np.ndarray, budget: int = 2**24
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read off each query's row of inner products with the whole gallery (cheaper than
        gathering K vectors per query when the gallery is this small)."""
        g = self.items[kind].global_.float()
        at = torch.from_numpy(ids)
        glob = torch.empty(ids.shape)
        label = torch.empty(ids.shape) if self.dim > self.tokens_dim else None
        step = max(1, budget // max(1, g.shape[0]))
        for s in range(0, len(queries), step):
            q = queries[s:s + step]
            glob[s:s + step] = (q @ g.T).gather(1, at[s:s + step])
            if label is not None:
                Dt = self.tokens_dim
                label[s:s + step] = (q[:, Dt:] @ g[:, Dt:].T).gather(1, at[s:s + step])
        return glob, label

    def local_scores(self, kind: str, ids: np.ndarray, qt: torch.Tensor, qm: torch.Tensor,
                     query_is_text: bool, reduce: str, budget: int = 2**22) -> torch.Tensor:
        """Exact MrSw of every (query, candidate) pair, batched so that only the smaller side is
        gathered per pair: when a candidate has more tokens than a query (text -> image: 49 cells
        against ~12 words), pairs are grouped by candidate and each candidate's tokens meet all
        its queries' tokens in one product; otherwise each step gathers its queries' candidates.
        Either way the scores end in `mrsw_from_sim`, as the index's rows do."""
        e = self.items[kind]
        Q, K = ids.shape
        S, D = e.tokens.shape[1], e.tokens.shape[2]
        T = max(1, int(token_extent(qm).max())) if Q else 1  # cut the queries' common padding
        qt, qm = qt[:, :T], qm[:, :T]
        out = torch.zeros(Q, K)
        valid = ids >= 0
        if S > T:  # group by candidate: gather the queries' (fewer) tokens, not the candidates'
            row, col = np.nonzero(valid)
            cand = ids[row, col]
            by = np.argsort(cand, kind="stable")
            row, col, cand = row[by], col[by], cand[by]
            starts = np.flatnonzero(np.r_[True, cand[1:] != cand[:-1]])
            for a, b in zip(starts, np.r_[starts[1:], len(cand)]):
                r = torch.from_numpy(row[a:b])
                c = int(cand[a])
                sim = (qt[r].reshape(-1, D) @ e.tokens[c].float().T).view(len(r), T, 1, S)
                cm = e.mask[c].expand(len(r), 1, S)
                out[r, torch.from_numpy(col[a:b])] = mrsw_from_sim(sim, qm[r], cm, query_is_text, reduce)[:, 0]
            return out
        safe = torch.from_numpy(np.where(valid, ids, 0))
        step = max(1, budget // max(1, K * S * max(D, T)))
        for s in range(0, Q, step):
            at = safe[s:s + step]
            cells = e.tokens[at].float()  # [q, K, S, D]
            sim = torch.bmm(qt[s:s + step], cells.reshape(len(at), K * S, D).transpose(1, 2)).view(len(at), T, K, S)
            out[s:s + step] = mrsw_from_sim(sim, qm[s:s + step], e.mask[at], query_is_text, reduce)
        return out
