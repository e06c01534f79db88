"""Every similarity the system uses: global cosine, TERAN MrSw, and the fused re-rank score.

One module so that training, evaluation, the indexer and the service cannot disagree on how a
pair is scored. All functions are batched torch ops and run wherever their tensors live.
"""
from __future__ import annotations

import torch

from .config import ScoreConfig

NEG = -1e4  # stands for -inf on masked cells, finite so fp16 and max() stay safe


def global_scores(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Cosine of L2-normalised vectors: [Q, D] x [G, D] -> [Q, G]."""
    return q @ g.T


def mrsw(words: torch.Tensor, word_mask: torch.Tensor, cells: torch.Tensor, cell_mask: torch.Tensor,
         reduce: str = "mean") -> torch.Tensor:
    """TERAN MrSw for all caption x image pairs: each word takes its best cell, then mean/sum.

    words [A, Tw, D], cells [B, Tc, D] -> [A, B]. Padding words contribute nothing; padding
    cells are never a word's best match.
    """
    sim = torch.einsum("atd,bsd->abts", words, cells)
    sim = sim.masked_fill(~cell_mask[None, :, None, :], NEG)
    best = sim.max(dim=-1).values  # [A, B, Tw]
    best = best * word_mask[:, None, :].to(best.dtype)
    total = best.sum(-1)
    if reduce == "sum":
        return total
    return total / word_mask.sum(-1, keepdim=True).clamp(min=1).to(total.dtype)


def mrsw_paired(words: torch.Tensor, word_mask: torch.Tensor, cells: torch.Tensor, cell_mask: torch.Tensor,
                reduce: str = "mean") -> torch.Tensor:
    """MrSw for aligned pairs (row i of words with row i of cells): [N, Tw, D], [N, Tc, D] -> [N]."""
    sim = torch.einsum("ntd,nsd->nts", words, cells)
    sim = sim.masked_fill(~cell_mask[:, None, :], NEG)
    best = sim.max(dim=-1).values * word_mask.to(sim.dtype)
    total = best.sum(-1)
    if reduce == "sum":
        return total
    return total / word_mask.sum(-1).clamp(min=1).to(total.dtype)


def token_extent(mask: torch.Tensor) -> torch.Tensor:
    """Per row, one past the last real token: how far a row's tokens can be cut."""
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * pos).max(dim=1).values


def mrsw_chunked(words: torch.Tensor, word_mask: torch.Tensor, cells: torch.Tensor, cell_mask: torch.Tensor,
                 reduce: str = "mean", budget: int = 2**26) -> torch.Tensor:
    """`mrsw` over large sets without materialising A*B*Tw*Tc at once."""
    A, Tw, _ = words.shape
    B, Tc, _ = cells.shape
    lengths = token_extent(word_mask)
    order = torch.argsort(lengths)  # chunks of similar length: padding is cut per chunk
    out = torch.empty(A, B, dtype=words.dtype, device=words.device)
    a = 0
    while a < A:
        T = max(1, int(lengths[order[min(A - 1, a + max(1, budget // max(1, B * Tw * Tc)) - 1)]]))
        step = max(1, budget // max(1, B * T * Tc))
        idx = order[a:a + step]
        T = max(1, int(lengths[idx].max()))
        out[idx] = mrsw(words[idx, :T], word_mask[idx, :T], cells, cell_mask, reduce)
        a += step
    return out


def word_alignment(words: torch.Tensor, word_mask: torch.Tensor, cells: torch.Tensor,
                   cell_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For one caption against N images: the best cell index and its score for every word.

    words [Tw, D], cells [N, Tc, D] -> (index [N, Tw], score [N, Tw]); padding words get -1.
    """
    sim = torch.einsum("td,nsd->nts", words, cells).masked_fill(~cell_mask[:, None, :], NEG)
    score, index = sim.max(dim=-1)
    index = index.masked_fill(~word_mask[None, :], -1)
    return index, score * word_mask[None, :].to(score.dtype)


def fuse(global_s: torch.Tensor, local_s: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """Re-rank score: the two raw scores standardised with validation statistics, then mixed."""
    zg = (global_s - cfg.global_mean) / cfg.global_std
    zl = (local_s - cfg.local_mean) / cfg.local_std
    return (1.0 - cfg.alpha) * zg + cfg.alpha * zl


def local_for_candidates(query_tokens: torch.Tensor, query_mask: torch.Tensor, cand_tokens: torch.Tensor,
                         cand_mask: torch.Tensor, query_is_text: bool, reduce: str = "mean") -> torch.Tensor:
    """MrSw of one query against its K gathered candidates, in one batched call.

    query [T, D] / [T]; candidates [K, S, D] / [K, S] -> [K]. Words are always the caption
    side, whichever side is the query.
    """
    K = cand_tokens.shape[0]
    q = query_tokens.unsqueeze(0).expand(K, -1, -1)
    qm = query_mask.unsqueeze(0).expand(K, -1)
    if query_is_text:
        return mrsw_paired(q, qm, cand_tokens, cand_mask, reduce)
    return mrsw_paired(cand_tokens, cand_mask, q, qm, reduce)
