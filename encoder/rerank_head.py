"""A small re-rank head on a frozen model's word embeddings (issue 14, lever B).

Trained by `encoder.train_rerank` on stage one's own candidates with the loss on the fused
score, so the local (MrSw) score learns what the global misses. It acts on the caption's token
embeddings only, after the text head (and the word mask); the image cells and the served global
vectors -- hence stage one -- stay exactly the frozen model's:

- each word's unit direction u becomes normalize(u + f(u)), f a linear map (or, with `hidden`,
  a one-hidden-layer MLP) whose output layer starts at zero;
- a caption's word weights (the text head's salience: each word vector's length, summing to 1
  over its words) become softmax(log w + b . u) over its kept words (b learned, zero at init),
  so the head can move weight between words.

At init the head is the identity for a caption whose weights sum to 1 (no word mask). A map of
the image cells was left out: without re-normalising the cells it equals a map of the words
(max over cells of w . (I + A) u), and re-normalising every cell of every candidate costs
D x D per cell per step, far more than the MrSw itself on 2 cores. The index stores the head's
word tokens; nothing else changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .heads import Embeddings


class RerankHead(nn.Module):
    def __init__(self, dim: int, word_weight: bool = True, hidden: int = 0):
        super().__init__()
        if hidden:
            self.text_map = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            last = self.text_map[-1]
        else:
            self.text_map = nn.Linear(dim, dim)
            last = self.text_map
        self.word_logit = nn.Linear(dim, 1) if word_weight else None
        for layer in (last,) + ((self.word_logit,) if word_weight else ()):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def text(self, emb: Embeddings) -> Embeddings:
        return Embeddings(emb.global_, self.text_tokens(emb.tokens, emb.mask), emb.mask, emb.domain)

    def text_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, T, D] word vectors (length = word weight) and their mask -> the head's word vectors."""
        t = tokens.float()
        w = t.norm(dim=-1)  # the text head's word weights (1 per word without salience)
        u = t / w.clamp(min=1e-12)[..., None]
        out = F.normalize(u + self.text_map(u), dim=-1)
        logit = torch.log(w.clamp(min=1e-12))
        if self.word_logit is not None:
            logit = logit + self.word_logit(u).squeeze(-1)
        weight = logit.masked_fill(~mask, float("-inf")).softmax(dim=1).nan_to_num(0.0)
        return (out * weight[..., None] * mask[..., None]).to(tokens.dtype)
