"""Grounding that a machine can check without box annotations: the mosaic pointing game, and
how much of the word-level (MrSw) score sits on content words.

Mosaic: four photos in a 2x2 layout on the backbone's cell grid, each photo filling whole
cells (at 224 px and 32-px cells: 3x3 cells per photo, a one-cell grey cross between them).
A caption of one photo is the query; each content word points at its best cell; a hit is a
cell inside that photo. Chance is the photo's share of the grid (9/49).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .similarity import word_alignment

BAND_GREY = (128, 128, 128)


@dataclass(frozen=True)
class MosaicLayout:
    grid: tuple[int, int] = (7, 7)  # the image backbone's cells
    cell: int = 32  # pixels per cell at the backbone's input size

    @property
    def photo_cells(self) -> int:
        return self.grid[0] // 2  # 3 of 7: the middle row and column are the band

    @property
    def size(self) -> tuple[int, int]:
        return self.grid[1] * self.cell, self.grid[0] * self.cell

    def origin(self, q: int) -> tuple[int, int]:
        """(row, col) of photo q's first cell (q = 0..3, row-major)."""
        r, c = divmod(q, 2)
        return r * (self.grid[0] - self.photo_cells), c * (self.grid[1] - self.photo_cells)

    def cells(self, q: int) -> set[int]:
        r0, c0 = self.origin(q)
        n = self.photo_cells
        return {(r0 + r) * self.grid[1] + c0 + c for r in range(n) for c in range(n)}

    @property
    def chance(self) -> float:
        return self.photo_cells ** 2 / (self.grid[0] * self.grid[1])

    def compose(self, photos: list[Image.Image]) -> Image.Image:
        """Four photos, each resized to its block of cells, on a grey background."""
        if len(photos) != 4:
            raise ValueError("a mosaic takes 4 photos")
        out = Image.new("RGB", self.size, BAND_GREY)
        side = self.photo_cells * self.cell
        for q, im in enumerate(photos):
            r0, c0 = self.origin(q)
            out.paste(im.convert("RGB").resize((side, side), Image.BICUBIC), (c0 * self.cell, r0 * self.cell))
        return out


def pointing_hits(best_cell: torch.Tensor, target: set[int]) -> int:
    """How many of the words' best cells ([W] indices) fall inside the target photo's cells."""
    return sum(int(c) in target for c in best_cell.tolist())


def word_scores(words: torch.Tensor, word_mask: torch.Tensor, cells: torch.Tensor,
                cell_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each real word's best cell and score against one image: ([W], [W])."""
    idx, score = word_alignment(words, word_mask, cells[None], cell_mask[None])
    keep = word_mask.nonzero().flatten()
    return idx[0, keep], score[0, keep]


def function_share(scores: torch.Tensor, content: torch.Tensor) -> float:
    """Share of the summed (positive) word scores that sits on non-content words."""
    pos = scores.clamp(min=0)
    total = float(pos.sum())
    return float(pos[~content].sum()) / total if total > 0 else 0.0
