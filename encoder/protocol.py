"""The standard cross-modal retrieval protocol, computed from score matrices.

Ranks are 0-based; a query's rank is that of its best-ranked ground truth (image->text has
several captions per image). Two-stage ranks are exact: a ground truth that stage one missed
ranks after all K candidates, by its global score among the rest, and is never a hit.
"""
from __future__ import annotations

import numpy as np
import torch


def ranks_full(scores: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """scores [Q, G], gt [Q, G] bool -> rank of the best ground truth per query."""
    best = scores.masked_fill(~gt, float("-inf")).max(dim=1, keepdim=True).values
    return (scores > best).sum(1).cpu().numpy()


def ranks_two_stage(global_s: torch.Tensor, cand: torch.Tensor, cand_s: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """global_s [Q, G]; cand [Q, K] stage-one candidate ids; cand_s [Q, K] re-rank scores."""
    K = cand.shape[1]
    gt_c = torch.gather(gt, 1, cand)  # [Q, K]
    best_c = cand_s.masked_fill(~gt_c, float("-inf")).max(dim=1, keepdim=True).values
    rank_in = (cand_s > best_c).sum(1)
    in_cand = gt_c.any(1)
    outside = torch.ones_like(gt)
    outside.scatter_(1, cand, False)
    best_g = global_s.masked_fill(~(gt & outside), float("-inf")).max(dim=1, keepdim=True).values
    rank_out = K + ((global_s > best_g) & outside).sum(1)
    return torch.where(in_cand, rank_in, rank_out).cpu().numpy()


def recall_table(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """R@1/5/10 in percent both ways, rsum and 1-based median ranks."""
    out: dict[str, float] = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = round(float(100.0 * (r < k).mean()), 2)
        out[f"{name}_medr"] = float(np.median(r) + 1)
    out["rsum"] = round(sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10)), 2)
    return out
