"""The ImageNet-label route (ConSE) and the adaptive fusion: class data, route maths, storage,
and the route through the real Encoder (torch and ONNX text runtimes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from encoder.config import LabelRouteConfig, ScoreConfig
from encoder.heads import Embeddings
from encoder.label_route import LabelRoute, imagenet_classes
from encoder.model import TGDTModel
from encoder.similarity import fuse
from encoder.words import is_content


def test_class_data_is_imagenet_order():
    rows = imagenet_classes()
    assert len(rows) == 1000
    assert rows[0][0] == "n01440764" and rows[0][1][0] == "tench"
    assert rows[-1][0] == "n15075141" and "toilet tissue" in rows[-1][1]
    synsets = [r[0] for r in rows]
    assert synsets == sorted(synsets) and len(set(synsets)) == 1000  # the classifier's (sorted wnid) order
    assert all(r[1] and r[2] for r in rows)  # every class has a lemma and a definition


def _route(cfg: LabelRouteConfig | None = None, seed: int = 0) -> LabelRoute:
    cfg = cfg or LabelRouteConfig(classes=5, sentence_dim=8, top_t=2, text_bank=4, image_bank=4, bank_top=2,
                                  text_lo=0.2, text_hi=0.8, image_lo=0.2, image_hi=0.8, weight_in=0.1, weight_out=2.0)
    g = torch.Generator().manual_seed(seed)
    r = LabelRoute(cfg)
    r.class_vectors.copy_(F.normalize(torch.randn(cfg.classes, cfg.sentence_dim, generator=g), dim=-1))
    r.text_bank.copy_(F.normalize(torch.randn(cfg.text_bank, cfg.sentence_dim, generator=g), dim=-1))
    r.image_bank.copy_(F.normalize(torch.randn(cfg.image_bank, cfg.sentence_dim, generator=g), dim=-1))
    r.text_centre.copy_(0.1 * torch.randn(cfg.sentence_dim, generator=g))
    r.image_centre.copy_(0.1 * torch.randn(cfg.sentence_dim, generator=g))
    return r


def test_picture_of_a_class_ranks_its_name_first():
    r = _route()
    logits = torch.full((1, 5), -4.0)
    logits[0, 3] = 6.0  # the classifier is sure: class 3
    label = r.image_labels(logits)
    assert int((label @ r.class_vectors.T).argmax()) == 3
    # a caption naming class 3 (its sentence vector = the class's name vector) matches it best
    captions = r.text_labels(r.class_vectors.clone())
    assert int((label @ captions.T).argmax()) == 3


def test_real_classifier_outputs_follow_the_class_file():
    """The packaged EfficientNet-Lite0's pretrained classifier, through the backbone's label
    tail, names a cat photo (scikit-image's `chelsea`) with a cat class of the shipped file."""
    from skimage import data

    from encoder.backbones import BackboneConfig, EfficientNetLite0

    bb = EfficientNetLite0(BackboneConfig(kind="efficientnet-lite0")).eval()
    bb.enable_labels(2)
    with torch.inference_mode():
        tb = bb(bb.preprocess(Image.fromarray(data.chelsea())).unsqueeze(0))
    assert tb.side.shape == (1, 1000) and tb.tokens.shape == (1, 49, 1280)
    name = " ".join(imagenet_classes()[int(tb.side.argmax())][1]).lower()
    assert "cat" in name


def test_domain_ramp_and_weights():
    r = _route()
    near = r.text_bank[:1].clone()  # an item equal to a bank entry lies in the domain
    far = -r.text_bank.mean(0, keepdim=True)
    d = r.domain(F.normalize(torch.cat([near, far]), dim=-1), "text")
    assert 0.0 <= float(d[1]) < float(d[0]) <= 1.0
    assert torch.allclose(r.weight(torch.tensor([1.0, 0.0])), torch.tensor([0.1, 2.0]))


def test_extended_inner_product_is_global_plus_weighted_labels():
    r = _route()
    g = F.normalize(torch.randn(3, 6), dim=-1)
    emb = Embeddings(g, torch.zeros(3, 1, 6), torch.ones(3, 1, dtype=torch.bool))
    labels = F.normalize(torch.randn(3, 8), dim=-1)
    img = r.extend(emb, labels, "image")
    cap = r.extend(emb, labels, "text")
    assert img.global_.shape == (3, 14) and img.domain.shape == (3,)
    wi, wc = r.weight(img.domain), r.weight(cap.domain)
    want = g @ g.T + torch.sqrt(wc[:, None] * wi[None, :]) * ((labels - r.text_centre) @ (labels - r.image_centre).T)
    assert torch.allclose(cap.global_ @ img.global_.T, want, atol=1e-5)


def test_rerank_weight_follows_query_domain():
    cfg = ScoreConfig(alpha=0.6, alpha_out=0.0)
    g, l = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    far = fuse(g, l, cfg, torch.tensor([0.0]))
    near = fuse(g, l, cfg, torch.tensor([1.0]))
    assert torch.allclose(far, g)  # a far query: global only, whatever the tokens say
    assert torch.allclose(near, 0.4 * g + 0.6 * l)
    assert torch.allclose(fuse(g, l, ScoreConfig(alpha=0.6)), near)  # no alpha_out: alpha for all


def test_route_and_fusion_saved_and_reloaded(tmp_path):
    from encoder.config import BackboneConfig, ModelConfig

    cfg = ModelConfig(image_backbone=BackboneConfig(kind="tiny-image", dim=16),
                      text_backbone=BackboneConfig(kind="tiny-text", dim=16), embed_dim=8,
                      score=ScoreConfig(alpha=0.4, alpha_out=0.1))
    model = TGDTModel(cfg, 16, 16, (2, 2))
    route = _route()
    model.attach_label_route(route)
    model.save_pretrained(tmp_path)
    back = TGDTModel.from_pretrained(tmp_path)
    assert back.config.label_route == route.cfg and back.config.score.alpha_out == 0.1
    assert back.config.global_dim == 8 + 8
    for name, buf in route.state_dict().items():
        assert torch.equal(back.label_route.state_dict()[name], buf), name


@pytest.fixture(scope="module")
def route_checkpoint(tmp_path_factory):
    """The committed default model with a route whose data is random (shapes as fitted)."""
    model = TGDTModel.from_pretrained(None)
    if model.label_route is None:
        cfg = LabelRouteConfig(text_bank=16, image_bank=16)
        model.attach_label_route(_route(cfg))
    model.config = model.config.model_copy(update={"score": model.config.score.model_copy(
        update={"alpha_out": 0.0})})
    return model.save_pretrained(tmp_path_factory.mktemp("route"))


def test_encoder_with_route_torch_and_onnx_agree(route_checkpoint):
    from encoder.pipeline import Encoder

    enc = Encoder.from_pretrained(route_checkpoint, device="cpu")
    assert enc.dim == enc.token_dim + 384
    img = enc.encode_images([Image.fromarray(np.full((64, 64, 3), 200, np.uint8))])
    assert img.global_.shape == (1, enc.dim) and img.domain is not None and 0 <= float(img.domain[0]) <= 1
    texts = ["a dog runs through the snow .", "a picture of a battleship"]
    ref = enc.encode_texts(texts)
    assert ref.global_.shape == (2, enc.dim)
    if enc.set_text_runtime("onnx") != "onnx":
        pytest.skip("onnxruntime not available")
    got = enc.encode_texts(texts)
    assert torch.allclose(got.global_, ref.global_, atol=1e-4)
    assert torch.allclose(got.domain, ref.domain, atol=1e-4)
    assert torch.equal(got.mask, ref.mask)


def test_rerank_weight_ramp_starts_at_alpha_from():
    cfg = ScoreConfig(alpha=0.4, alpha_out=0.0, alpha_from=0.5)
    a = cfg.alpha_for(torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.allclose(a, torch.tensor([0.0, 0.0, 0.2, 0.4]))


def test_index_with_route_serves_label_share_and_content_words(route_checkpoint, tiny_collection, tmp_path):
    """An index built by a route checkpoint stores 640-d globals beside 256-d tokens; a search's
    hits say how much of their global score the label route gave."""
    from indexer.build import build
    from indexer.config import BuildConfig
    from indexer.searcher import Searcher

    out = tmp_path / "index"
    build(BuildConfig(images=str(tiny_collection), captions=str(tiny_collection / "pairs.jsonl"), out=str(out),
                      checkpoint=str(route_checkpoint), workers=0, batch_size=4, progress=False))
    s = Searcher(out, device="cpu")
    assert s.manifest.dim == s.manifest.tokens_dim + 384
    text = "a red dog runs on the beach ."
    res = s.search_text(text, k=3, candidates=6, explain=True)
    assert res.hits and all(h.label_score is not None for h in res.hits)
    q = s.encoder.encode_texts([text]).global_[0].numpy()
    g = s.gather("image", np.array([h.id for h in res.hits]))
    Dt = s.manifest.tokens_dim
    for h, gv in zip(res.hits, g.global_):
        assert abs(h.global_score - float(gv @ q)) < 1e-4
        assert abs(h.label_score - float(gv[Dt:] @ q[Dt:])) < 1e-4  # the route's columns only
        assert [a["content"] for a in h.alignment] == [is_content(a["word"]) for a in h.alignment]


def test_class_prompts_can_carry_the_wordnet_definition():
    from encoder.config import LabelRouteConfig
    from encoder.label_route import class_prompts, imagenet_classes

    classes = imagenet_classes()
    for cfg, first in ((LabelRouteConfig(prompt="a {}: {definition}", lemmas=2),
                        [f"a {x}: {classes[0][2]}" for x in classes[0][1][:2]]),
                       (LabelRouteConfig(prompt="a {}", lemmas=1), [f"a {classes[0][1][0]}"])):
        prompts = class_prompts(cfg)
        assert len(prompts) == 1000 and prompts[0] == first and classes[0][2]
