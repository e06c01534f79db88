"""TGDT branch heads: frozen backbone tokens -> token embeddings + token-guided global embedding.

Both modalities use the same module with separate weights (TGDT's homogeneous branches); only
the position encoding differs (2-D cell grid for images, 1-D for text). The global embedding
adds a pooled-input MLP to the token-guided slot: the MLP alone is a strong single-vector
model on frozen features, and the transformer slot learns what the tokens add to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import TokenBatch
from .config import HeadConfig


@dataclass
class Embeddings:
    global_: torch.Tensor  # [B, D], L2-normalised
    tokens: torch.Tensor  # [B, T, D], L2-normalised (padding rows zero; scaled by salience if enabled)
    mask: torch.Tensor  # [B, T] bool
    # [B] in [0, 1]: how close each item lies to the training data (1 = in domain), set by the
    # label route (`encoder.label_route`); None for models without one
    domain: torch.Tensor | None = None

    def to(self, device) -> "Embeddings":
        return Embeddings(self.global_.to(device), self.tokens.to(device), self.mask.to(device),
                          None if self.domain is None else self.domain.to(device))

    def __getitem__(self, idx) -> "Embeddings":
        return Embeddings(self.global_[idx], self.tokens[idx], self.mask[idx],
                          None if self.domain is None else self.domain[idx])


def _layer(dim: int, cfg: HeadConfig) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(dim, cfg.heads, dim * cfg.ffn_mult, cfg.dropout,
                                      activation="gelu", batch_first=True, norm_first=True)


class SlotBlock(nn.Module):
    """One token-guided global step: the global slot cross-attends to the token embeddings.

    Costs two projections per token instead of a full layer over all positions, which keeps
    the global branch token-guided while the token branch pays for the self-attention.
    """

    def __init__(self, dim: int, cfg: HeadConfig):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, dim * cfg.ffn_mult), nn.GELU(), nn.Dropout(cfg.dropout),
                                nn.Linear(dim * cfg.ffn_mult, dim))

    def forward(self, slot: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(tokens)
        slot = slot + self.attn(self.norm_q(slot), kv, kv, key_padding_mask=pad, need_weights=False)[0]
        return slot + self.ff(self.norm_ff(slot))


class PooledTower(nn.Module):
    """A single-vector model on the mean of the backbone's tokens: standardised with training
    statistics, then dropout -> hidden -> GELU -> dropout -> dim, L2-normalised.

    This is the plain baseline of seeds.md, and alone it beats the token-guided global as a
    first stage (BENCHMARKS.md). Trained on its own, after the TGDT branches, it also errs
    differently from their token match, so a re-rank by MrSw adds more on top of it.
    """

    def __init__(self, in_dim: int, hidden: int, dim: int, dropout: float = 0.3):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))

    def set_statistics(self, pooled: torch.Tensor) -> None:
        self.mean.copy_(pooled.mean(0))
        self.std.copy_(pooled.std(0).clamp(min=1e-6))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net((pooled - self.mean) / self.std), dim=-1)


def pool_tokens(tb: TokenBatch) -> torch.Tensor:
    """Mean of each row's real tokens [B, T, D] -> [B, D]."""
    x, mask = tb.tokens.float(), tb.mask
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


class TGDTHead(nn.Module):
    def __init__(self, in_dim: int, dim: int, cfg: HeadConfig, grid: tuple[int, int] | None, max_len: int,
                 pooled_global: int = 0):
        super().__init__()
        self.cfg = cfg
        # the served global when set (see PooledTower); the token-guided global then only trains
        self.pooled_global = PooledTower(in_dim, pooled_global, dim) if pooled_global else None
        self.grid = grid
        self.norm_in = nn.LayerNorm(in_dim)
        self.drop_in = nn.Dropout(cfg.input_dropout)
        self.proj = nn.Linear(in_dim, dim)
        if grid is not None:
            self.row = nn.Parameter(torch.zeros(grid[0], dim))
            self.col = nn.Parameter(torch.zeros(grid[1], dim))
        else:
            self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.token_layers = nn.ModuleList([_layer(dim, cfg) for _ in range(cfg.token_layers)])
        self.token_out = nn.Linear(dim, dim)
        self.salience = nn.Linear(dim, 1) if cfg.word_salience else None
        self.global_slot = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        block = (lambda: SlotBlock(dim, cfg)) if cfg.global_mode == "cross" else (lambda: _layer(dim, cfg))
        self.global_layers = nn.ModuleList([block() for _ in range(cfg.global_layers)])
        self.global_norm = nn.LayerNorm(dim)
        self.global_out = nn.Linear(dim, dim)
        if cfg.global_mlp_hidden:
            self.mlp = nn.Sequential(
                nn.LayerNorm(in_dim), nn.Dropout(0.3), nn.Linear(in_dim, cfg.global_mlp_hidden), nn.GELU(),
                nn.Dropout(0.3), nn.Linear(cfg.global_mlp_hidden, dim),
            )
        else:
            self.mlp = None

    def positions(self, T: int) -> torch.Tensor:
        if self.grid is not None:
            pe = (self.row[:, None, :] + self.col[None, :, :]).reshape(-1, self.row.shape[-1])
            return pe[:T]
        return self.pos[:T]

    def forward(self, tb: TokenBatch) -> Embeddings:
        x, mask = tb.tokens.float(), tb.mask
        pos = self.positions(x.shape[1]).expand(x.shape[0], -1, -1)
        if self.training and self.cfg.token_keep < 1.0 and bool(mask.all()) and tb.word_states is None:
            n = max(1, round(x.shape[1] * self.cfg.token_keep))
            keep = torch.rand(mask.shape, device=x.device).argsort(dim=1)[:, :n].sort(dim=1).values
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
            pos = torch.gather(pos, 1, keep[..., None].expand(-1, -1, pos.shape[-1]))
            mask = mask[:, :n]
        if self.training and self.cfg.token_drop > 0:
            keep = torch.rand(mask.shape, device=mask.device) >= self.cfg.token_drop
            keep[torch.arange(mask.shape[0]), mask.float().argmax(1)] = True  # never drop every token
            mask = mask & keep
        pooled = pool_tokens(TokenBatch(x, mask))
        # the token branch reads another layer's word states when the backbone gives them
        # (`BackboneConfig.token_layer`); the pooled global keeps the last layer's
        src = x if tb.word_states is None else tb.word_states.float()
        h = self.proj(self.drop_in(self.norm_in(src))) + pos
        pad = ~mask
        for layer in self.token_layers:
            h = layer(h, src_key_padding_mask=pad)
        tokens = F.normalize(self.token_out(h), dim=-1) * mask[..., None]
        if self.salience is not None:
            # MrSw weights every word alike, so "a" and "the" count as much as "dog". A learned
            # softmax weight per word, folded into the word vector's length, turns MrSw-sum into
            # a salience-weighted mean; max over cells is unchanged by the positive scale, so the
            # index, the kernels and grounding need nothing new.
            w = self.salience(h).squeeze(-1).masked_fill(~mask, float("-inf")).softmax(dim=1)
            tokens = tokens * w.nan_to_num(0.0)[..., None]
        if self.pooled_global is not None:
            return Embeddings(self.pooled_global(pooled), tokens, mask)
        if self.cfg.global_mode == "cross":
            g = self.global_slot.expand(x.shape[0], -1, -1)
            for layer in self.global_layers:
                g = layer(g, h, pad)
        else:
            g = torch.cat([self.global_slot.expand(x.shape[0], -1, -1), h], dim=1)
            gpad = torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)
            for layer in self.global_layers:
                g = layer(g, src_key_padding_mask=gpad)
        glob = self.global_out(self.global_norm(g[:, 0]))
        if self.mlp is not None:
            glob = glob + self.mlp(pooled)
        return Embeddings(F.normalize(glob, dim=-1), tokens, mask)
