"""The standard cross-modal retrieval protocol, computed from score matrices.

Ranks are 0-based; a query's rank is that of its best-ranked ground truth (image->text has
several captions per image). Ranks come from what the search engine returns: a ground truth
missing from a query's list (stage one missed it) ranks after the whole list and is never a hit.
"""
from __future__ import annotations

import numpy as np
import torch


def ranks_full(scores: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """scores [Q, G], gt [Q, G] bool -> rank of the best ground truth per query."""
    best = scores.masked_fill(~gt, float("-inf")).max(dim=1, keepdim=True).values
    return (scores > best).sum(1).cpu().numpy()


def ranks_in_lists(ranked: np.ndarray, target: np.ndarray) -> np.ndarray:
    """ranked [Q, w]: the ground-truth key of each returned item, best first (-1: none); target
    [Q]: each query's key -> rank of its first match; a query whose match is not in its list
    (a stage-one miss, or past the list) ranks w, after everything returned."""
    ranked = np.asarray(ranked)
    hit = ranked == np.asarray(target)[:, None]
    first = hit.argmax(1)
    return np.where(hit.any(1), first, ranked.shape[1])


def owners(caption_ids: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Ranked caption positions [Q, w] (-1: none) -> the position of each one's image (-1: none)."""
    return np.where(caption_ids >= 0, caption_image[np.maximum(caption_ids, 0)], -1)


def recall_table(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """R@1/5/10 in percent both ways, rsum and 1-based median ranks."""
    out: dict[str, float] = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = round(float(100.0 * (r < k).mean()), 2)
        out[f"{name}_medr"] = float(np.median(r) + 1)
    out["rsum"] = round(sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10)), 2)
    return out
