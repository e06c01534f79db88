"""Training the last MiniLM layer(s) with the heads (`train_layers`): the cached-hidden training
path equals the frozen backbone at init, and a saved checkpoint encodes raw captions (torch and
ONNX) exactly as the training path does; the config refuses what it cannot do."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from encoder.backbones import HiddenBatch, MiniLM, TextTop
from encoder.config import BackboneConfig, HeadConfig, ModelConfig, TrainConfig
from encoder.features import cache_complete, cache_name, cache_text_hidden, load_cached
from encoder.model import TGDTModel, checkpoint_digest
from encoder.pipeline import Encoder

MAX_TOKENS = 16
CAPTIONS = ["a dog runs on the beach", "Two children play in the snow while their mother watches from a bench",
            "a black cat sits", "", "word " * 40, "A man in a red jacket climbs a rock wall ."]


@pytest.fixture(scope="module")
def backbone() -> MiniLM:
    return MiniLM(BackboneConfig(kind="minilm", max_tokens=MAX_TOKENS))


def _model_config(n: int = 1) -> ModelConfig:
    head = HeadConfig(token_layers=1, global_layers=1, heads=2, global_mlp_hidden=32, dropout=0.0, input_dropout=0.0)
    return ModelConfig(image_backbone=BackboneConfig(kind="tiny-image", dim=32),
                       text_backbone=BackboneConfig(kind="minilm", max_tokens=MAX_TOKENS, train_layers=n),
                       embed_dim=32, image_head=head, text_head=head)


def _from_cache(path) -> HiddenBatch:
    d = load_cached(path)
    return HiddenBatch(torch.from_numpy(d["hidden"]).float(), torch.from_numpy(d["attention"]),
                       torch.from_numpy(d["words"]))


def _assert_same(a, b, atol: float) -> None:
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.global_, b.global_, atol=atol), (a.global_ - b.global_).abs().max()
    assert torch.allclose(a.tokens, b.tokens, atol=atol), (a.tokens - b.tokens).abs().max()


@pytest.mark.parametrize("n", [1, 2])
@torch.no_grad()
def test_text_top_at_init_reproduces_the_frozen_word_states(backbone, n):
    top = TextTop(backbone, n).eval()
    ref = backbone(CAPTIONS)
    got = top(backbone.hidden_before_top(CAPTIONS, n))
    assert torch.equal(got.mask, ref.mask) and got.tokens.shape == ref.tokens.shape
    assert torch.isfinite(got.tokens).all()
    assert torch.allclose(got.tokens, ref.tokens, atol=1e-5)
    assert all(p.requires_grad for p in top.parameters())
    assert not any(p.requires_grad for p in backbone.parameters())  # the copies, not the backbone


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_hf_text_folder_top_matches_under_either_attention_mask(tmp_path, attn):
    """eager attention takes an additive float mask, sdpa a boolean one: TextTop builds whichever
    the backbone's own forward builds."""
    import shutil

    from transformers import BertConfig, BertModel

    from encoder.backbones import HFText, minilm_path

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, folder / name)
    with pytest.raises(ValidationError, match="has 2 layers"):
        BackboneConfig(kind="hf-text", path=str(folder), train_layers=3)
    bb = HFText(BackboneConfig(kind="hf-text", path=str(folder), max_tokens=8, train_layers=1))
    bb.net.set_attn_implementation(attn)
    top = TextTop(bb, 1).eval()
    ref, got = bb(CAPTIONS), top(bb.hidden_before_top(CAPTIONS, 1))
    assert torch.equal(got.mask, ref.mask) and torch.allclose(got.tokens, ref.tokens, atol=1e-5)


@torch.no_grad()
def test_hidden_cache_is_fp16_resumable_and_keyed_apart(backbone, tmp_path):
    path = cache_text_hidden(CAPTIONS, backbone, 1, tmp_path / "h.h5", batch_size=2)
    with h5py.File(path, "r") as f:
        assert f["hidden"].dtype == np.float16 and f["hidden"].shape == (len(CAPTIONS), MAX_TOKENS + 2, 384)
        full = {k: f[k][()] for k in ("hidden", "attention", "words")}
    assert full["attention"][:, 0].all() and not full["words"][:, 0].any()  # [CLS] kept, not a word
    # a run killed after the first batch: later rows are missing, `done` says so; a re-run fills them
    first = np.sort(np.argsort([len(t) for t in CAPTIONS], kind="stable")[:2])  # the first batch written
    with h5py.File(path, "a") as f:
        for k in full:
            f[k][...] = 0
            f[k][first] = full[k][first]
        f.attrs["done"] = 2
    assert not cache_complete(path)
    with pytest.raises(RuntimeError, match="incomplete"):
        load_cached(path)
    cache_text_hidden(CAPTIONS, backbone, 1, path, batch_size=2)
    again = load_cached(path)
    assert all(np.array_equal(again[k], full[k]) for k in full)
    # the fp16 cache still reproduces the frozen word states (to fp16 rounding)
    got = TextTop(backbone, 1).eval()(_from_cache(path))
    assert torch.allclose(got.tokens, backbone(CAPTIONS).tokens, atol=2e-2)
    # cache names: train_layers=0 and token_layer=None keep the pre-existing key (old caches are
    # reused: the dump as it was before either field existed), N > 0 or a token layer differs
    frozen = BackboneConfig(kind="minilm")
    legacy = {k: v for k, v in frozen.model_dump().items() if k not in ("train_layers", "token_layer")}
    import hashlib

    old = f"text-minilm-{hashlib.sha1(json.dumps([legacy, CAPTIONS]).encode()).hexdigest()[:12]}.h5"
    assert cache_name("text", frozen, CAPTIONS) == old
    assert cache_name("text", BackboneConfig(kind="minilm", train_layers=1), CAPTIONS) != old
    assert cache_name("text", BackboneConfig(kind="minilm", token_layer=2), CAPTIONS) != old


def test_finetuned_checkpoint_encodes_raw_captions_like_the_training_path(backbone, tmp_path, monkeypatch, refuse_call):
    torch.manual_seed(0)
    model = TGDTModel(_model_config(1), image_dim=32, text_dim=384, image_grid=(4, 4))
    model.eval().save_pretrained(tmp_path / "init")
    before = {k: v.clone() for k, v in model.text_top.state_dict().items()}
    with torch.no_grad():
        hb = backbone.hidden_before_top(CAPTIONS, 1)
    # a few steps that move text_top (and the head) away from the pretrained weights
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        e = model.encode_text_cache(hb)
        loss = (e.global_ @ e.global_.T).sum() - e.tokens.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(before[k], v) for k, v in model.text_top.state_dict().items() if k.endswith("weight"))
    model.eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        ref = model.encode_text_cache(hb)
        ref16 = model.encode_text_cache(_from_cache(cache_text_hidden(CAPTIONS, backbone, 1, tmp_path / "h.h5")))

    # round trip: the fine-tuned layers are in the safetensors, and identify the checkpoint
    with monkeypatch.context() as m:  # the checkpoint supplies the top: no pretrained load for it
        import transformers

        refuse_call(m, transformers.AutoModel, "from_pretrained")
        loaded = TGDTModel.from_pretrained(ckpt)
    sd = loaded.state_dict()
    assert any(k.startswith("text_top.layers.0.") for k in sd)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert checkpoint_digest(ckpt) != checkpoint_digest(tmp_path / "init")

    enc = Encoder.from_pretrained(ckpt, device="cpu")
    got = enc.encode_texts(CAPTIONS)
    _assert_same(got, ref, atol=1e-5)
    _assert_same(got, ref16, atol=5e-3)  # the training cache is fp16
    # the backbone itself now runs the fine-tuned layer (text_top is not applied a second time)
    with torch.no_grad():
        assert not torch.allclose(enc.text_backbone(CAPTIONS).tokens, backbone(CAPTIONS).tokens, atol=1e-3)
    pytest.importorskip("onnxruntime")
    assert enc.set_text_runtime("onnx") == "onnx"
    try:
        _assert_same(enc.encode_texts(CAPTIONS), ref, atol=1e-4)
        one = enc.encode_texts(CAPTIONS[:1])  # the 8-word-slot graph
        n = int(ref.mask[0].sum())
        assert torch.allclose(one.tokens[0], ref.tokens[0, :n], atol=1e-4)
    finally:
        enc.set_text_runtime("torch")


def test_dropout_in_the_copied_layers_follows_train_and_eval(backbone):
    top = TextTop(backbone, 1)
    with torch.no_grad():
        hb = backbone.hidden_before_top(CAPTIONS[:2], 1)
        top.train()
        a, b = top(hb).tokens, top(hb).tokens
        top.eval()
        c, d = top(hb).tokens, top(hb).tokens
    assert not torch.equal(a, b) and torch.equal(c, d)


@pytest.mark.parametrize("kw,match", [
    (dict(kind="tiny-text", train_layers=1), "only for the backbones"),
    (dict(kind="hf-vision", path="x", train_layers=1), "only for the backbones"),
    (dict(kind="minilm", train_layers=7), "has 6 layers"),
    (dict(kind="minilm", train_layers=-1), "greater than or equal to 0"),
    (dict(kind="hf-text", train_layers=1), "needs `path`"),
])
def test_config_refuses_what_cannot_be_trained(kw, match):
    with pytest.raises(ValidationError, match=match):
        BackboneConfig(**kw)


def test_config_accepts_the_finetune_config_and_defaults():
    assert BackboneConfig(kind="minilm", train_layers=6).train_layers == 6
    assert BackboneConfig(kind="minilm").train_layers == 0
    from encoder.cli import DEFAULT_CONFIG

    frozen = json.loads((DEFAULT_CONFIG.parent / "frozen_backbones.json").read_text())
    fine = json.loads((DEFAULT_CONFIG.parent / "finetune_text.json").read_text())
    assert fine.pop("out") == "runs/finetune_text"
    assert fine["model"]["text_backbone"].pop("train_layers") == 1
    frozen.pop("out")
    assert fine == frozen
    cfg = TrainConfig.from_file(DEFAULT_CONFIG.parent / "finetune_text.json")
    assert cfg.backbone_lr < cfg.lr


def test_train_with_a_trainable_text_top_checkpoints_and_resumes(tmp_path, split_collection):
    from encoder.train import param_groups, train

    data = split_collection(tmp_path / "col")
    cfg = TrainConfig(data=str(data), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), epochs=1,
                      batch_size=4, rerank_k=5, select_k=5, num_threads=2, model=_model_config(1))
    groups = param_groups(TGDTModel(cfg.model, 32, 384, (4, 4)), cfg)
    assert sorted((g["base_lr"], g["weight_decay"]) for g in groups) == \
        sorted([(cfg.backbone_lr, cfg.weight_decay), (cfg.backbone_lr, 0.0), (cfg.lr, cfg.weight_decay), (cfg.lr, 0.0)])
    ckpt = train(cfg, progress=False)
    assert [p.name.split("-")[0] for p in sorted((tmp_path / "cache").iterdir())] == ["hidden", "image"]
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    cfg2 = cfg.model_copy(update={"epochs": 2})
    train(cfg2, progress=False)
    log2 = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [h["epoch"] for h in log2["history"]] == [1, 2] and log2["history"][0] == log["history"][0]
    model = TGDTModel.from_pretrained(tmp_path / "run" / "checkpoint")
    pretrained = TextTop(MiniLM(BackboneConfig(kind="minilm", max_tokens=MAX_TOKENS)), 1).state_dict()
    assert any(not torch.equal(pretrained[k], v) for k, v in model.text_top.state_dict().items())
    assert TGDTModel.from_pretrained(ckpt).config.text_backbone.train_layers == 1
