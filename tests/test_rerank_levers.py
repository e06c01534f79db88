"""Issue 14's last two levers: multi-scale pooled regions (`encoder.regions`) and a re-rank head
trained on stage one's candidates with the loss on the fused score (`encoder.rerank_head`,
`encoder.train_rerank`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from encoder.config import ScoreConfig
from encoder.frozen_cache import FrozenSplit
from encoder.heads import Embeddings
from encoder.model import TGDTModel
from encoder.pipeline import Encoder
from encoder.regions import multiscale_regions, region_cells
from encoder.rerank_head import RerankHead
from encoder.train_rerank import RerankTrainConfig, fused_logits, multi_positive_nce, stage_one, train_head
from tests.conftest import make_tiny_checkpoint


# ---------------------------------------------------------------- lever A: regions
def test_multiscale_regions_of_a_known_grid():
    """A 3x3 grid of one-hot cells: the 2x2 windows are the normalised means of their 4 cells,
    the whole-image region is the normalised mean of all 9, and region_cells names them."""
    cells = torch.eye(9)[None]  # cell i = e_i, D = 9
    emb = Embeddings(torch.zeros(1, 4), cells, torch.ones(1, 9, dtype=torch.bool))
    out = multiscale_regions(emb, (3, 3), windows=(2,), whole=True)
    assert out.tokens.shape == (1, 9 + 4 + 1, 9) and bool(out.mask.all())
    assert torch.equal(out.tokens[0, :9], cells[0])  # the cells come first, unchanged
    expect = F.normalize(cells[0, [0, 1, 3, 4]].mean(0), dim=0)  # window at (0, 0)
    assert torch.allclose(out.tokens[0, 9], expect)
    assert torch.allclose(out.tokens[0, 12], F.normalize(cells[0, [4, 5, 7, 8]].mean(0), dim=0))  # at (1, 1)
    assert torch.allclose(out.tokens[0, 13], torch.full((9,), 1 / 3))
    names = region_cells((3, 3), windows=(2,), whole=True)
    assert names[9] == {0, 1, 3, 4} and names[12] == {4, 5, 7, 8} and names[13] == set(range(9)) and names[2] == {2}
    # a word about an object spread over cells 0, 1, 3, 4 matches their region better than any cell
    word = F.normalize(cells[0, [0, 1, 3, 4]].sum(0) + 0.1 * cells[0, 2], dim=0)
    best = int((out.tokens[0] @ word).argmax())
    assert names[best] == {0, 1, 3, 4}
    assert len(region_cells((7, 7))) == multiscale_regions(
        Embeddings(torch.zeros(2, 4), torch.randn(2, 49, 8), torch.ones(2, 49, dtype=torch.bool)), (7, 7)).tokens.shape[1]


# ---------------------------------------------------------------- lever B: the re-rank head
def test_rerank_head_starts_as_the_identity_and_keeps_masked_words_out():
    torch.manual_seed(0)
    u = F.normalize(torch.randn(2, 5, 8), dim=-1)
    w = torch.softmax(torch.randn(2, 5), dim=1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    head = RerankHead(8)
    assert torch.allclose(head.text_tokens(u * w[..., None], mask), u * w[..., None], atol=1e-6)
    mask[0, 3:] = False
    out = head.text_tokens(u * w[..., None] * mask[..., None], mask)
    assert torch.equal(out[0, 3:], torch.zeros(2, 8))
    assert torch.allclose(out[0].norm(dim=-1).sum(), torch.tensor(1.0))  # weights re-spread over kept words


def test_stage_one_adds_the_missed_positive():
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])  # positive = item 3, the worst
    cand, gs, pos, valid = stage_one(q, g, lambda rows, n: torch.arange(n)[None] == 3, k=2)
    assert cand.tolist() == [[3, 0, 1]] and pos.tolist() == [[True, False, False]] and bool(valid.all())
    assert torch.allclose(gs, torch.tensor([[-1.0, 1.0, 0.9]]))


def test_fused_loss_is_lower_when_the_local_score_favours_the_positive():
    gs = torch.zeros(1, 3)
    valid, pos = torch.ones(1, 3, dtype=torch.bool), torch.tensor([[True, False, False]])
    sc = ScoreConfig(global_mean=0.0, global_std=1.0)
    good = multi_positive_nce(fused_logits(gs, torch.tensor([[2.0, 0.0, 0.0]]), valid, sc, 0.5, torch.tensor(5.0)), pos)
    bad = multi_positive_nce(fused_logits(gs, torch.tensor([[0.0, 2.0, 0.0]]), valid, sc, 0.5, torch.tensor(5.0)), pos)
    assert good < bad


def _synthetic(n: int, seed: int) -> tuple[FrozenSplit, torch.Tensor]:
    """Images of 4 random cells; one caption each whose 3 words are a fixed rotation R of 3 of its
    photo's cells (so the frozen MrSw cannot see the match, a learned word map can); globals are
    noise with a faint hint of the match (stage one finds candidates, not the answer)."""
    g = torch.Generator().manual_seed(seed)
    D = 8
    R = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(99)))[0]
    cells = F.normalize(torch.randn(n, 4, D, generator=g), dim=-1)
    words = F.normalize(cells[:, :3] @ R + 0.05 * torch.randn(n, 3, D, generator=g), dim=-1) / 3
    base = torch.randn(n, 16, generator=g)
    ig = F.normalize(base + 2.0 * torch.randn(n, 16, generator=g), dim=-1)
    cg = F.normalize(base + 2.0 * torch.randn(n, 16, generator=g), dim=-1)
    images = Embeddings(ig, cells, torch.ones(n, 4, dtype=torch.bool))
    caps = Embeddings(cg, words, torch.ones(n, 3, dtype=torch.bool))
    split = FrozenSplit(images, caps, torch.arange(n), torch.ones(n, 3, dtype=torch.bool),
                        torch.ones(n, 3, dtype=torch.long))
    return split, R


def _positive_rank(head: RerankHead, split: FrozenSplit, score: ScoreConfig) -> float:
    """Mean rank (0 = top) of each caption's photo among its 8 stage-one candidates, fused score."""
    ci = split.caption_image
    cand, gs, pos, valid = stage_one(split.captions.global_, split.images.global_,
                                     lambda rows, n: ci[rows, None] == torch.arange(n)[None], 8)
    with torch.no_grad():
        words = head.text_tokens(split.captions.tokens, split.captions.mask)
        local = torch.einsum("btd,bksd->bkts", words, split.images.tokens[cand]).amax(-1).sum(-1)
        logits = fused_logits(gs, local, valid, score, 0.5, torch.tensor(5.0))
    return float((logits > logits.masked_fill(~pos, -1e9).amax(1, keepdim=True)).sum(1).float().mean())


def test_training_moves_the_positive_up():
    train, _ = _synthetic(96, 0)
    held, _ = _synthetic(48, 1)
    score = ScoreConfig(global_mean=0.0, global_std=0.2, local_reduce="sum")
    cfg = RerankTrainConfig(k=8, k_i2t=4, epochs=40, batch_size=32, lr=0.05, weight_decay=0.0)
    before = _positive_rank(RerankHead(8), held, score)
    logs = []
    head, summary = train_head(cfg, train, score, val=None, log=logs.append)
    losses = [h["loss"] for h in summary["history"] if h["loss"] is not None]
    assert losses[-1] < 0.5 * losses[0]
    after = _positive_rank(head, held, score)
    assert after < 0.5 * before, (before, after)  # on captions it never trained on


def test_checkpoint_with_a_head_round_trips_and_leaves_the_global_alone(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "plain", dim=8)
    model = TGDTModel.from_pretrained(src)
    head = RerankHead(8, hidden=16)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    model.attach_rerank_head(head)
    out = model.save_pretrained(tmp_path / "rerank")
    plain, enc = Encoder.from_pretrained(src, "cpu"), Encoder.from_pretrained(out, "cpu")
    assert enc.model.config.rerank_head.hidden == 16
    texts = ["a dog runs on the grass", "two men"]
    a, b = plain.encode_texts(texts), enc.encode_texts(texts)
    assert torch.equal(a.global_, b.global_) and torch.equal(a.mask, b.mask)
    assert not torch.allclose(a.tokens, b.tokens)
    with torch.no_grad():
        assert torch.allclose(b.tokens, head.text_tokens(a.tokens.clone(), a.mask.clone()), atol=1e-5)
    photos = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (10, 90, 200))]
    pa, pb = plain.encode_images(photos), enc.encode_images(photos)  # the image side is not touched
    assert torch.equal(pa.tokens, pb.tokens) and torch.equal(pa.global_, pb.global_)


def test_local_scores_equal_mrsw_and_its_gradient():
    """The training's MrSw (best cells found without autograd) equals `similarity.mrsw`, value and gradient."""
    from encoder.similarity import mrsw
    from encoder.train_rerank import image_to_text_local, text_to_image_local

    torch.manual_seed(0)
    words = torch.randn(3, 4, 6, requires_grad=True)
    wm = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    cells = torch.randn(5, 7, 6)
    cand = torch.tensor([[0, 1], [2, 3], [4, 0]])
    got = text_to_image_local(words, wm, cells[cand])
    ref = torch.stack([mrsw(words[i:i + 1], wm[i:i + 1], cells[cand[i]], torch.ones(2, 7, dtype=torch.bool),
                            "sum")[0] for i in range(3)])
    assert torch.allclose(got, ref, atol=1e-5)
    g1, = torch.autograd.grad(got.sum(), words)
    g2, = torch.autograd.grad(ref.sum(), words)
    assert torch.allclose(g1, g2, atol=1e-5)
    # image queries: image 1 against captions 0 and 2
    one = torch.ones(1, 7, dtype=torch.bool)
    with torch.no_grad():
        back = image_to_text_local(cells[[1]], words[[0, 2]][None], wm[[0, 2]][None])[0]
        expect = torch.cat([mrsw(words[[i]], wm[[i]], cells[[1]], one, "sum")[0] for i in (0, 2)])
    assert torch.allclose(back, expect, atol=1e-5)
