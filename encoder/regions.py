"""Object-like image regions from the cell grid (issue 14, lever A): multi-scale pooled cells.

MrSw lets each caption word take its best *cell* of the backbone's 7x7 grid; an object often
spans several cells. `multiscale_regions` adds to an image's cell tokens the mean of every
k x k window of cells (stride 1) for each `window` k, and optionally the whole image's mean, each
re-normalised to unit length, so a word may match a larger region. Derived from the cells at
query time: nothing new is stored. `region_cells` says which cells each region token covers (the
mosaic pointing game counts a region as pointing into a photo only when all its cells lie there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .heads import Embeddings


def region_cells(grid: tuple[int, int], windows: tuple[int, ...] = (2, 3), whole: bool = True) -> list[frozenset[int]]:
    """Cell indices (row-major) each region token covers, in `multiscale_regions`' order."""
    H, W = grid
    out = [frozenset({i}) for i in range(H * W)]
    for k in windows:
        if not 1 < k <= min(H, W):
            raise ValueError(f"window {k} must be in 2..{min(H, W)} for a {H}x{W} grid")
        for r in range(H - k + 1):
            for c in range(W - k + 1):
                out.append(frozenset((r + i) * W + c + j for i in range(k) for j in range(k)))
    if whole:
        out.append(frozenset(range(H * W)))
    return out


def multiscale_regions(images: Embeddings, grid: tuple[int, int], windows: tuple[int, ...] = (2, 3),
                       whole: bool = True) -> Embeddings:
    """Image embeddings whose tokens are the cells followed by the pooled regions (see module doc).

    tokens [B, H*W, D] (full grids: every cell real) -> [B, H*W + R, D]."""
    H, W = grid
    B, S, D = images.tokens.shape
    if S != H * W or not bool(images.mask.all()):
        raise ValueError(f"multi-scale regions need full {H}x{W} grids, got {S} tokens")
    x = images.tokens.float().transpose(1, 2).reshape(B, D, H, W)
    parts = [images.tokens.float()]
    for k in windows:
        if not 1 < k <= min(H, W):
            raise ValueError(f"window {k} must be in 2..{min(H, W)} for a {H}x{W} grid")
        parts.append(F.avg_pool2d(x, k, stride=1).flatten(2).transpose(1, 2))
    if whole:
        parts.append(images.tokens.float().mean(1, keepdim=True))
    pooled = [F.normalize(p, dim=-1) if i else p for i, p in enumerate(parts)]
    tokens = torch.cat(pooled, 1).to(images.tokens.dtype)
    mask = torch.ones(B, tokens.shape[1], dtype=torch.bool, device=images.mask.device)
    return Embeddings(images.global_, tokens, mask, images.domain)
