"""MrSw masking, fused score, and each CMC loss term on tiny known inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoder.config import LossConfig, ScoreConfig
from encoder.heads import Embeddings
from encoder.loss import cmc_loss, hinge_hardest, infonce, intra_consistency
from encoder.ranking import MemoryGallery, stage_two
from encoder.similarity import fuse, mrsw, mrsw_chunked, word_alignment


def test_mrsw_each_word_takes_best_cell_and_padding_is_ignored():
    e = torch.eye(3)
    words = torch.stack([torch.stack([e[0], e[1], torch.full((3,), 9.0)])])  # 3rd word is padding
    word_mask = torch.tensor([[True, True, False]])
    cells = torch.stack([torch.stack([e[0], e[2], torch.full((3,), 5.0)])])  # 3rd cell is padding
    cell_mask = torch.tensor([[True, True, False]])
    s = mrsw(words, word_mask, cells, cell_mask)
    # word0 best = 1 (cell0), word1 best = 0 ; padding word and padding cell never count
    assert s.shape == (1, 1)
    assert s.item() == pytest.approx(0.5)
    assert mrsw(words, word_mask, cells, cell_mask, reduce="sum").item() == pytest.approx(1.0)


def test_mrsw_variants_agree():
    torch.manual_seed(0)
    w = F.normalize(torch.randn(5, 7, 8), dim=-1)
    wm = torch.rand(5, 7) > 0.3
    wm[:, 0] = True
    c = F.normalize(torch.randn(4, 6, 8), dim=-1)
    cm = torch.ones(4, 6, dtype=torch.bool)
    full = mrsw(w, wm, c, cm)
    assert torch.allclose(mrsw_chunked(w, wm, c, cm, budget=50), full, atol=1e-6)
    # the search engine's stage two over per-query candidate lists, both directions, against the
    # training's all-pairs matrix
    words, cells = Embeddings(w[:, 0], w, wm), Embeddings(c[:, 0], c, cm)
    gallery = MemoryGallery(cells, words)
    cand_t2i = np.array([[3, 1], [0, 2], [1, 1], [2, 0], [3, 0]])
    cand_i2t = np.array([[4, 0, 2], [1, 3, 0], [2, 2, 4], [0, 1, 3]])
    t2i = stage_two(gallery, words, True, "image", cand_t2i, True, "mean").local
    i2t = stage_two(gallery, cells, False, "caption", cand_i2t, True, "mean").local
    assert torch.allclose(t2i, full.gather(1, torch.from_numpy(cand_t2i)), atol=1e-6)
    assert torch.allclose(i2t, full.T.gather(1, torch.from_numpy(cand_i2t)), atol=1e-6)
    idx, score = word_alignment(w[0], wm[0], c, cm)
    assert idx.shape == (4, 7) and (idx[:, ~wm[0]] == -1).all()
    assert torch.allclose((score.sum(1) / wm[0].sum()), full[0], atol=1e-6)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_engine_local_scores_match_the_full_matrix_with_padding_on_both_sides(reduce):
    torch.manual_seed(1)
    w = F.normalize(torch.randn(6, 5, 8), dim=-1)
    wm = torch.rand(6, 5) > 0.4
    wm[0] = False  # a caption with no real word scores 0
    wm[1, 0], wm[1, 1:] = False, True  # words need not start at position 0
    c = F.normalize(torch.randn(3, 4, 8), dim=-1)
    cm = torch.tensor([[True, True, True, True], [True, False, True, False], [False, False, False, True]])
    full = mrsw(w, wm, c, cm, reduce)
    gallery = MemoryGallery(Embeddings(c[:, 0], c, cm), Embeddings(w[:, 0], w, wm))
    img = np.array([[2, 0, 1, 1]] * 6)  # repeated, unsorted candidates, the same for every caption
    img[5, 2:] = -1  # a query with fewer candidates: padding ids
    for budget in (1, 2**22):  # one query per step, or all at once
        got = gallery.local_scores("image", img, w, wm, True, reduce, budget=budget)
        for cap in range(6):
            n = int((img[cap] >= 0).sum())
            assert torch.allclose(got[cap, :n], full[cap, img[cap, :n]], atol=1e-6)
    assert got[0].abs().sum() == 0  # a caption with no real word scores 0
    caps = np.array([[5, 0, 3, 3, 1]] * 3)
    got = gallery.local_scores("caption", caps, c, cm, False, reduce)
    for im in range(3):
        assert torch.allclose(got[im], full[caps[im], im], atol=1e-6)


def test_fuse_standardises_then_mixes():
    cfg = ScoreConfig(alpha=0.25, global_mean=0.5, global_std=0.1, local_mean=2.0, local_std=4.0)
    out = fuse(torch.tensor([0.6]), torch.tensor([6.0]), cfg)
    assert out.item() == pytest.approx(0.75 * 1.0 + 0.25 * 1.0)


def test_infonce_and_hinge_known_values():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -math.log(math.e / (math.e + 1))
    assert infonce(s, 1.0).item() == pytest.approx(expected, rel=1e-5)
    s2 = torch.tensor([[0.5, 0.6], [0.1, 0.9]])
    # i2t: row0 hardest neg 0.6 -> 0.2+0.6-0.5=0.3, row1 0.1 -> 0 ; t2i: col0 0.1 -> 0, col1 0.6 -> 0.2+0.6-0.9=0
    assert hinge_hardest(s2, 0.2).item() == pytest.approx(0.3 / 2)


def test_intra_consistency_zero_when_similarities_agree_and_positive_otherwise():
    v = F.normalize(torch.randn(4, 8), dim=-1)
    assert intra_consistency(v, v, margin=0.3).item() == 0.0
    t = F.normalize(torch.randn(4, 8), dim=-1)
    manual = F.relu((t @ t.T - v @ v.T).abs().max(0).values - 0.3).mean()
    assert intra_consistency(v, t, margin=0.3).item() == pytest.approx(manual.item())
    assert intra_consistency(v, t, margin=0.0, form="mse").item() > 0


@pytest.mark.parametrize("form", ["infonce", "hinge"])
def test_cmc_terms_decrease_under_optimisation(form):
    torch.manual_seed(0)
    B, T, D = 8, 5, 16
    img_tok = torch.nn.Parameter(torch.randn(B, T, D))
    txt_tok = torch.nn.Parameter(torch.randn(B, T, D))
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    lscale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    cfg = LossConfig(form=form, inter_weight=1.0, local_weight=1.0, intra_weight=1.0, intra_margin=0.05)
    opt = torch.optim.Adam([img_tok, txt_tok, scale, lscale], lr=0.05)
    mask = torch.ones(B, T, dtype=torch.bool)

    def losses():
        it, tt = F.normalize(img_tok, dim=-1), F.normalize(txt_tok, dim=-1)
        img = Embeddings(F.normalize(it.mean(1), dim=-1), it, mask)
        txt = Embeddings(F.normalize(tt.mean(1), dim=-1), tt, mask)
        return cmc_loss(img, txt, cfg, scale, lscale)

    first = {k: v.item() for k, v in losses().items()}
    assert set(first) == {"inter", "local", "intra", "total"}
    for _ in range(60):
        opt.zero_grad()
        losses()["total"].backward()
        opt.step()
    last = {k: v.item() for k, v in losses().items()}
    for term in ("inter", "local", "total"):
        assert last[term] < first[term], term
    assert last["intra"] <= first["intra"] + 1e-6
