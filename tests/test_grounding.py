"""The word mask (content words carry MrSw and the grounding) and the mosaic grounding metric."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer

from encoder.backbones import minilm_path
from encoder.config import BackboneConfig, ModelConfig, ScoreConfig
from encoder.grounding import MosaicLayout, function_share, pointing_hits, word_scores
from encoder.heads import Embeddings
from encoder.model import TGDTModel
from encoder.similarity import mrsw
from encoder.words import caption_content, is_content


def test_content_words():
    assert not any(is_content(w) for w in (".", ",", "a", "the", "of", "is", "[CLS]", "[SEP]", "'s"))
    assert all(is_content(w) for w in ("dog", "runs", "snow", "##er", "red", "two"))
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    got = caption_content(tok, ["a dog runs through the snow .", "surfer riding a big wave"], max_tokens=6)
    assert got[0].tolist() == [False, True, True, False, False, True]  # cut at 6 kept words: "." dropped
    assert got[1, :5].tolist() == [True, True, False, True, True]


def _tiny_model(word_mask: str) -> TGDTModel:
    cfg = ModelConfig(image_backbone=BackboneConfig(kind="tiny-image", dim=8),
                      text_backbone=BackboneConfig(kind="tiny-text", dim=8), embed_dim=8,
                      score=ScoreConfig(local_reduce="sum", word_mask=word_mask))
    return TGDTModel(cfg, 8, 8, (2, 2))


def test_function_word_cannot_dominate_mrsw():
    """'a dog .': the article's token matches a cell perfectly, 'dog' weakly. Unmasked, the
    article carries MrSw; with the word mask it takes no part, and only 'dog' is scored."""
    e = torch.eye(8)
    cells = torch.stack([e[0], e[1], e[2], e[3]])[None]  # one image, 4 cells
    dog = F.normalize(0.3 * e[1] + e[5], dim=-1)
    words = torch.stack([e[0], dog, e[2]])[None]  # "a", "dog", "."
    mask = torch.ones(1, 3, dtype=torch.bool)
    content = torch.tensor([[False, True, False]])
    emb = Embeddings(torch.zeros(1, 8), words, mask)
    cmask = torch.ones(1, 4, dtype=torch.bool)
    plain = _tiny_model("none").content_words(emb, content)
    masked = _tiny_model("function").content_words(emb, content)
    full = mrsw(plain.tokens, plain.mask, cells, cmask, "sum")
    only = mrsw(masked.tokens, masked.mask, cells, cmask, "sum")
    assert float(full) > 2.0  # "a" and "." score 1.0 each
    assert abs(float(only) - float(dog[1])) < 1e-6  # only "dog" remains
    _, sc = word_scores(plain.tokens[0], plain.mask[0], cells[0], cmask[0])
    assert function_share(sc, content[0]) > 0.8
    _, sc = word_scores(masked.tokens[0], masked.mask[0], cells[0], cmask[0])
    assert function_share(sc, content[0][masked.mask[0]]) == 0.0


def test_mosaic_layout_places_photos_on_whole_cells():
    lay = MosaicLayout()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    m = lay.compose([Image.new("RGB", (50, 80), c) for c in colours])
    assert m.size == (224, 224)
    for q, c in enumerate(colours):
        for cell in lay.cells(q):
            r, k = divmod(cell, 7)
            assert m.getpixel((k * 32 + 16, r * 32 + 16)) == c
    assert m.getpixel((3 * 32 + 16, 3 * 32 + 16)) == (128, 128, 128)  # the band
    all_cells = [lay.cells(q) for q in range(4)]
    assert all(len(s) == 9 for s in all_cells) and len(set().union(*all_cells)) == 36
    assert abs(lay.chance - 9 / 49) < 1e-9


def test_pointing_game_on_a_synthetic_mosaic():
    """Cells of photo 2 hold the vectors of the caption's words; the grey band holds a vector
    close to the last word only: every word but that one points into photo 2."""
    lay = MosaicLayout()
    D = 16
    g = torch.Generator().manual_seed(0)
    cells = F.normalize(torch.randn(49, D, generator=g), dim=-1) * 0.1
    words = F.normalize(torch.randn(4, D, generator=g), dim=-1)
    target = sorted(lay.cells(2))
    for k in range(3):
        cells[target[k * 3]] = words[k]
    cells[3 * 7 + 3] = words[3]  # the band's centre cell
    best, score = word_scores(words, torch.ones(4, dtype=torch.bool), cells, torch.ones(49, dtype=torch.bool))
    assert pointing_hits(best, lay.cells(2)) == 3
    assert pointing_hits(best, lay.cells(0)) == 0
    assert torch.allclose(score, torch.ones(4), atol=1e-5)
