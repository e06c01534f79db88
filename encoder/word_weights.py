"""A word-salience prior for the token re-rank: inverse document frequency of word pieces.

MrSw adds up every word's best cell alike, so a word every caption has ("man", "is",
"wearing") counts as much as the rare word that tells two photos apart ("accordion"). With
`score.word_weight: "idf"` each word's vector is scaled by a weight looked up by its word-piece
id in a table fitted on the training captions (issue 14):

    idf(t) = log((1 + N) / (1 + df(t))) + 1          (N captions, df: captions holding t)
    w(t)   = idf(t) ** power / mean over the training captions' word occurrences of idf ** power

so an average word keeps weight ~1 and a piece never seen in training gets the largest one.
A positive scale does not change which cell a word picks, so the grounding's alignment is
the same and MrSw(sum) becomes sum_t w(t) max_c <word_t, cell_c>; the weighted vectors are what
an index stores, so the indexer, the service and every MrSw kernel need nothing new. The table
is a buffer of the model (`model.safetensors`, key `word_weight_table`): it travels and is
hashed with the checkpoint, and no pickle is involved.
"""
from __future__ import annotations

import torch


def idf_table(ids: torch.Tensor, vocab: int, power: float = 1.0) -> torch.Tensor:
    """[vocab] float32 word weights from the training captions' kept ids ([M, T], 0 = padding):
    smoothed IDF to `power`, divided by its mean over the captions' word occurrences."""
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    M = ids.shape[0]
    if M == 0:
        raise ValueError("no captions to fit word weights on")
    real = ids > 0
    ranked = ids.sort(dim=1).values  # a caption counts once per piece: its first occurrence
    first = torch.ones_like(real)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    df = torch.bincount(ranked[first & (ranked > 0)], minlength=vocab).to(torch.float64)
    idf = (torch.log((1.0 + M) / (1.0 + df)) + 1.0) ** power
    mean = idf[ids[real]].mean() if bool(real.any()) else idf.mean()
    return (idf / mean).to(torch.float32)


def apply(tokens: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Word vectors [B, T, D] scaled by their ids' weights (padding stays zero)."""
    T = tokens.shape[1]
    w = table.to(tokens.device)[ids[:, :T].to(tokens.device).clamp(0, table.numel() - 1)]
    return tokens * (w * mask).unsqueeze(-1).to(tokens.dtype)
