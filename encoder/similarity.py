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


def fuse(global_s: torch.Tensor, local_s: torch.Tensor, cfg: ScoreConfig,
         domain: torch.Tensor | None = None) -> torch.Tensor:
    """Re-rank score: the two raw scores standardised with validation statistics, then mixed.

    `domain` ([Q], one per row of the score matrices, or [1] for one query's [K] scores): the
    queries' in-domain-ness, which sets each query's local weight (`ScoreConfig.alpha_for`).
    """
    zg = (global_s - cfg.global_mean) / cfg.global_std
    zl = (local_s - cfg.local_mean) / cfg.local_std
    a = cfg.alpha_for(domain)
    if isinstance(a, torch.Tensor):
        a = a.to(zg.dtype).reshape(-1, *([1] * (zg.dim() - 1))) if zg.dim() > 1 else a.to(zg.dtype).reshape(-1)
    return (1.0 - a) * zg + a * zl


def local_from_flat(sim: torch.Tensor, query_mask: torch.Tensor, lengths: torch.Tensor, query_is_text: bool,
                    reduce: str = "mean") -> torch.Tensor:
    """MrSw of one query against K candidates whose tokens lie back to back (as the index stores
    them): sim [T, sum(lengths)] (query tokens x candidate tokens) -> [K].

    Lets the service score straight from stored rows: padding the small score matrix costs far
    less than padding the candidates' token vectors.
    """
    lengths = lengths.to(torch.long)
    K, T = int(lengths.numel()), sim.shape[0]
    S = int(lengths.max()) if K else 0
    cand_mask = torch.arange(S)[None, :] < lengths[:, None]
    if bool(cand_mask.all()):
        sim4 = sim.reshape(1, T, K, S)
    else:
        sim4 = sim.new_full((T, K * S), NEG)
        sim4[:, cand_mask.reshape(-1)] = sim
        sim4 = sim4.view(1, T, K, S)
    return mrsw_from_sim(sim4, query_mask[None], cand_mask[None], query_is_text, reduce)[0]


def mrsw_from_sim(sim: torch.Tensor, query_mask: torch.Tensor, cand_mask: torch.Tensor, query_is_text: bool,
                  reduce: str) -> torch.Tensor:
    """[Q, T, K, S] token scores -> [Q, K] MrSw (words: the caption side, whichever is the query).

    The one MrSw of a query against its candidates: the service (`local_from_flat`, from the
    index's stored rows) and in-memory search (`ranking.MemoryGallery`) both end here; the
    training's all-pairs `mrsw` is tested equal to it."""
    if query_is_text:  # words = query [Q, T]; cells = candidates [Q, K, S]
        full = bool(cand_mask.all())  # e.g. image grids: nothing to mask, skip a copy of sim
        best = (sim if full else sim.masked_fill(~cand_mask[:, None, :, :], NEG)).max(dim=-1).values  # [Q, T, K]
        best = best * query_mask[:, :, None].to(best.dtype)
        total = best.sum(1)
        count = query_mask.sum(1, keepdim=True)
    else:  # cells = query [Q, T]; words = candidates [Q, K, S]
        best = sim.masked_fill(~query_mask[:, :, None, None], NEG).max(dim=1).values  # [Q, K, S]
        best = best * cand_mask.to(best.dtype)
        total = best.sum(-1)
        count = cand_mask.sum(-1)
    if reduce == "sum":
        return total
    return total / count.clamp(min=1).to(total.dtype)
