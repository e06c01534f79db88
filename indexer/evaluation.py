"""Evaluate through a built index: its stored vectors and tokens, its FAISS as stage one.

`encoder evaluate --index DIR` calls `load_for_evaluation`; nothing is re-encoded, so the
numbers measure what the service will actually serve (token compression and approximate
FAISS included).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import faiss_index, metadata
from .searcher import IndexStore

StageOne = Callable[[torch.Tensor, str, int], tuple[torch.Tensor, torch.Tensor]]


def _embeddings(store: IndexStore, kind: str, ids: np.ndarray, max_tokens: int | None, chunk: int = 2048):
    from encoder.heads import Embeddings

    D = store.manifest.tokens_dim
    n = len(ids)
    S = max_tokens
    if S is None:
        S = store.manifest.image_tokens
    glob = torch.zeros(n, store.manifest.dim)
    tokens = torch.zeros(n, S, D)
    mask = torch.zeros(n, S, dtype=torch.bool)
    for s in range(0, n, chunk):
        g = store.gather(kind, ids[s:s + chunk])
        t = g.tokens.shape[1]
        glob[s:s + chunk] = torch.from_numpy(g.global_)
        tokens[s:s + chunk, :t] = torch.from_numpy(g.tokens)
        mask[s:s + chunk, :t] = torch.from_numpy(g.mask)
    return Embeddings(glob, tokens, mask)


def make_stage_one(store: IndexStore, galleries: dict[str, np.ndarray], restricted: bool,
                   device: torch.device | str = "cpu") -> StageOne:
    """(query globals [Q, D], "t2i"/"i2t", K) -> (dense stored-vector scores [Q, G], FAISS candidates [Q, K]).

    Candidates are positions in the evaluation gallery. Where FAISS returns fewer than K (an
    IVF probe that saw too few vectors) the row is padded with the gallery items of lowest
    global score, which can only rank last -- the approximate index is not helped.
    """
    vecs = {k: torch.from_numpy(store._globals(k, ids)).to(device) for k, ids in galleries.items()}

    def run(q: torch.Tensor, direction: str, k: int):
        kind = "image" if direction == "t2i" else "caption"
        ids = galleries[kind]
        dense = q.float() @ vecs[kind].T
        k = min(k, len(ids))
        deny = store.tables[kind].deleted_ids
        _, I = faiss_index.search(store.faiss[kind], q.float().cpu().numpy(), k, store.manifest.faiss[kind],
                                  allow=ids if restricted else None, deny=deny if len(deny) else None)
        pos = np.searchsorted(ids, I)
        ok = (I >= 0) & (pos < len(ids))
        ok &= ids[np.minimum(pos, len(ids) - 1)] == I
        cand = torch.from_numpy(np.where(ok, pos, -1))
        if (~ok).any():
            worst = dense.argsort(dim=1)[:, : k].cpu()  # ascending: lowest scores first
            for r in np.nonzero((~ok).any(1))[0]:
                have = set(cand[r][cand[r] >= 0].tolist())
                fill = [int(x) for x in worst[r] if int(x) not in have][: int((cand[r] < 0).sum())]
                cand[r][cand[r] < 0] = torch.tensor(fill, dtype=torch.long)
        return dense, cand.to(dense.device)

    return run


def load_for_evaluation(index_dir: str | Path, filters: dict | None = None, device: str | None = None):
    """(images, captions, caption_image, stage_one, score_config) from an index.

    `filters` (e.g. {"split": "test"}) restricts both galleries to matching images and their
    captions, with FAISS searching only inside that subset.
    """
    store = IndexStore(index_dir)
    dev = torch.device(device or "cpu")
    con = store._con()
    img_ids = np.array(metadata.matching_ids(con, "image", filters, store.metadata_fields), dtype=np.int64)
    if filters:
        cap_ids = np.array(metadata.matching_ids(con, "caption", filters, store.metadata_fields), dtype=np.int64)
    else:
        cap_ids = store.tables["caption"].live_ids
    rows = {}
    if len(cap_ids):
        for r in con.execute("SELECT id, image_id FROM items WHERE kind='caption' AND deleted=0"):
            rows[r[0]] = r[1]
    owners = np.array([rows[int(c)] for c in cap_ids], dtype=np.int64)
    keep = np.isin(owners, img_ids)
    cap_ids, owners = cap_ids[keep], owners[keep]
    caption_image = torch.from_numpy(np.searchsorted(img_ids, owners)).long()
    images = _embeddings(store, "image", img_ids, store.manifest.image_tokens)
    cap_len = None
    if len(cap_ids):
        cap_len = max(int(store.segments[int(s)].kinds["caption"]["lengths"][p].max()) for s, p in
                      [(s, store.tables["caption"].locate(cap_ids)[1][store.tables["caption"].locate(cap_ids)[0] == s])
                       for s in np.unique(store.tables["caption"].locate(cap_ids)[0])])
    captions = _embeddings(store, "caption", cap_ids, cap_len or 1)
    restricted = bool(filters) or len(img_ids) != len(store.tables["image"].live_ids)
    stage_one = make_stage_one(store, {"image": img_ids, "caption": cap_ids}, restricted, dev)
    return images.to(dev), captions.to(dev), caption_image.to(dev), stage_one, store.score_config()
