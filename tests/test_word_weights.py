"""Issue 14's levers: an IDF prior weight per word in MrSw (`encoder.word_weights`) and the
token branch fed from a lower text layer (`BackboneConfig.token_layer`)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from encoder.backbones import build_image_backbone, build_text_backbone
from encoder.config import BackboneConfig, ModelConfig, ScoreConfig
from encoder.heads import Embeddings
from encoder.model import TGDTModel, checkpoint_digest
from encoder.pipeline import Encoder
from encoder.similarity import local_from_flat, mrsw
from encoder.word_weights import idf_table
from tests.conftest import tiny_model_config

MAN, ACCORDION, UNSEEN = 5, 9, 7


def _captions() -> torch.Tensor:
    """Four captions' kept ids (0 = padding): 'man' in all of them, 'accordion' in one."""
    return torch.tensor([[MAN, 3, 0], [MAN, ACCORDION, 0], [MAN, 4, 3], [3, MAN, MAN]])


def test_idf_rare_word_outweighs_frequent_one():
    ids = _captions()
    w = idf_table(ids, vocab=12)
    assert w[ACCORDION] > 1.5 * w[MAN]
    assert w[UNSEEN] == w.max() and w[UNSEEN] > w[ACCORDION]  # never seen in training: the rarest
    assert abs(float(w[ids[ids > 0]].mean()) - 1.0) < 1e-5  # an average word keeps weight 1
    # a piece twice in one caption counts once in its document frequency: 'man' is in all 4
    raw = torch.log(torch.tensor(5.0) / (1.0 + torch.tensor([0.0, 4.0, 1.0]))) + 1.0  # unseen, man, accordion
    assert float(w[UNSEEN] / w[MAN]) == pytest.approx(float(raw[0] / raw[1]), rel=1e-5)
    assert float(w[ACCORDION] / w[MAN]) == pytest.approx(float(raw[2] / raw[1]), rel=1e-5)
    assert torch.allclose(idf_table(ids, 12, power=0.0), torch.ones(12))
    with pytest.raises(ValueError):
        idf_table(ids, 12, power=-1.0)


def _model(word_weight: str = "none") -> TGDTModel:
    cfg = tiny_model_config(8).model_copy(update={"score": ScoreConfig(local_reduce="sum")})
    model = TGDTModel(cfg, 8, 8, (2, 2))
    if word_weight == "idf":
        model.set_word_weights("idf", idf_table(_captions(), 12))
    return model


def test_idf_weight_lets_the_rare_word_decide_the_ranking():
    """'man accordion': photo A has a perfect man and a faint accordion, photo B a faint man and
    a clear accordion. Plain MrSw ranks A first; with IDF weights the rare word decides: B."""
    e = torch.eye(8)
    man, acc = e[0], e[1]
    words = torch.stack([man, acc])[None]
    emb = Embeddings(torch.zeros(1, 8), words, torch.ones(1, 2, dtype=torch.bool))
    ids = torch.tensor([[MAN, ACCORDION]])
    a = torch.stack([man, F.normalize(0.2 * acc + e[4], dim=-1)])
    b = torch.stack([F.normalize(0.3 * man + e[5], dim=-1), F.normalize(0.8 * acc + 0.6 * e[6], dim=-1)])
    cells, cmask = torch.stack([a, b]), torch.ones(2, 2, dtype=torch.bool)
    plain = _model().content_words(emb, None, ids)
    weighted = _model("idf").content_words(emb, None, ids)
    s_plain = mrsw(plain.tokens, plain.mask, cells, cmask, "sum")[0]
    s_idf = mrsw(weighted.tokens, weighted.mask, cells, cmask, "sum")[0]
    assert s_plain[0] > s_plain[1] and s_idf[1] > s_idf[0]
    # the service's kernel on stored rows agrees with the batch kernel
    flat = local_from_flat(weighted.tokens[0] @ cells.reshape(-1, 8).T, weighted.mask[0],
                           torch.tensor([2, 2]), query_is_text=True, reduce="sum")
    assert torch.allclose(flat, s_idf, atol=1e-6)
    # a positive weight never changes which cell a word picks (the grounding)
    for m in (plain, weighted):
        assert torch.equal(torch.einsum("td,nsd->nts", m.tokens[0], cells).argmax(-1),
                           torch.einsum("td,nsd->nts", words[0], cells).argmax(-1))
    with pytest.raises(ValueError, match="word_weight"):
        _model("idf").content_words(emb, None, None)


def test_word_weights_survive_save_and_reload(tmp_path):
    model = _model()
    plain_dir = model.save_pretrained(tmp_path / "plain")
    table = torch.rand(997) + 0.5
    model.set_word_weights("idf", table)
    path = model.save_pretrained(tmp_path / "idf")
    back = TGDTModel.from_pretrained(path)
    assert back.config.score.word_weight == "idf"
    assert torch.equal(back.word_weight_table, table)
    assert checkpoint_digest(path) != checkpoint_digest(plain_dir)  # the table is part of the model's identity
    assert not hasattr(TGDTModel.from_pretrained(plain_dir), "word_weight_table")
    # through the Encoder (tiny text backbone: its ids are word hashes): every word vector's
    # length is its weight (the tiny head's words are unit vectors)
    enc_plain, enc = Encoder.from_pretrained(plain_dir, "cpu"), Encoder.from_pretrained(path, "cpu")
    tb = enc.text_backbone(["a man plays the accordion"])
    got, ref = enc.encode_texts(["a man plays the accordion"]), enc_plain.encode_texts(["a man plays the accordion"])
    assert torch.allclose(got.tokens.norm(dim=-1)[0], table[tb.ids[0]], atol=1e-5)
    assert torch.allclose(F.normalize(got.tokens, dim=-1), ref.tokens, atol=1e-5)
    assert torch.equal(got.global_, ref.global_)


def test_token_layer_config_is_checked():
    with pytest.raises(ValueError, match="token_layer"):
        BackboneConfig(kind="tiny-text", token_layer=1)
    with pytest.raises(ValueError, match="layers"):
        BackboneConfig(kind="minilm", token_layer=7)  # MiniLM-L6
    with pytest.raises(ValueError, match="train_layers"):
        BackboneConfig(kind="minilm", token_layer=2, train_layers=1)


@torch.inference_mode()
def test_token_layer_feeds_the_token_branch_and_onnx_agrees():
    """With token_layer = 2 the text head's token branch reads MiniLM's layer-2 states (the
    pooled global still the last layer's), in torch and in the ONNX query graph alike."""
    pytest.importorskip("onnxruntime")
    cfg = ModelConfig(image_backbone=BackboneConfig(kind="tiny-image", dim=8),
                      text_backbone=BackboneConfig(kind="minilm", token_layer=2), embed_dim=16,
                      pooled_global=32)
    backbone = build_text_backbone(cfg.text_backbone)
    texts = ["a dog runs on the beach", "two children play in the snow"]
    tb = backbone(texts)
    enc_in = backbone.tokenizer(texts, padding=True, return_tensors="pt")
    states = backbone.net(**enc_in, output_hidden_states=True).hidden_states
    assert torch.allclose(tb.word_states[0, :6], states[2][0, 1:7], atol=1e-5)  # [CLS] dropped
    assert torch.allclose(tb.tokens[0, :6], states[-1][0, 1:7], atol=1e-5)
    torch.manual_seed(0)
    model = TGDTModel(cfg, 8, backbone.dim, (2, 2)).eval()
    lower = model.text_head(tb)
    last = model.text_head(type(tb)(tb.tokens, tb.mask))
    assert torch.equal(lower.global_, last.global_)  # the pooled global reads the last layer
    assert not torch.allclose(lower.tokens, last.tokens, atol=1e-3)
    enc = Encoder(model, build_image_backbone(cfg.image_backbone), backbone, device="cpu")
    ref = enc.encode_texts(texts)
    assert torch.allclose(ref.tokens, lower.tokens, atol=1e-5)
    enc.set_text_runtime("onnx")
    got = enc.encode_texts(texts)
    assert torch.allclose(got.tokens, ref.tokens, atol=1e-4) and torch.allclose(got.global_, ref.global_, atol=1e-4)


def test_word_weights_command(tmp_path, tiny_checkpoint, split_collection):
    """`encoder word-weights` writes a checkpoint weighting words by the train captions' IDF
    with its fusion re-fitted on val; a collection without splits is refused (exit 2)."""
    from encoder.cli import main

    data = split_collection(tmp_path / "col")
    out = tmp_path / "idf"
    assert main(["word-weights", "--checkpoint", str(tiny_checkpoint), "--data", str(data), "--out", str(out)]) == 0
    model = TGDTModel.from_pretrained(out)
    assert model.config.score.word_weight == "idf" and model.config.score.confidence_rerank is None
    enc = Encoder.from_pretrained(out, "cpu")
    captions = [json.loads(line)["captions"] for line in (data / "pairs.jsonl").read_text().splitlines()[:8]]
    ids = enc.text_backbone.kept_ids([c for cs in captions for c in cs])
    assert torch.allclose(model.word_weight_table, idf_table(ids, enc.text_backbone.vocab_size))
    assert model.config.score.local_std != TGDTModel.from_pretrained(tiny_checkpoint).config.score.local_std
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "pairs.jsonl").write_text((data / "pairs.jsonl").read_text().replace('"split": "val"', '"split": "train"'))
    (flat / "images").symlink_to(data / "images")
    assert main(["word-weights", "--checkpoint", str(tiny_checkpoint), "--data", str(flat), "--out",
                 str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_fine_tuning_a_weighted_checkpoint_starts_unweighted():
    """`--init-from` a checkpoint with IDF weights: the fine-tune's model has none (they belong
    to the source's captions; `encoder word-weights` adds them back), and nothing fails."""
    from encoder.init_from import branches_and_towers, with_word_mask

    source = _model("idf")
    model, _ = branches_and_towers(source)
    assert model.config.score.word_weight == "none" and not hasattr(model, "word_weight_table")
    assert torch.equal(model.text_head.proj.weight, source.text_head.proj.weight)
    assert with_word_mask(source.config, tiny_model_config(8)).score.word_weight == "none"
