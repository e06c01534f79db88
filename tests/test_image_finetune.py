"""Training EfficientNet-Lite0's last blocks with the heads (`image_backbone.train_layers`): the
cached-grid training path equals the frozen backbone at init, and a saved checkpoint encodes
raw images exactly as the training path does; the config refuses what it cannot do."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from encoder.backbones import EfficientNetLite0, ImageTop, TokenBatch
from encoder.config import BackboneConfig, HeadConfig, ModelConfig, TrainConfig
from encoder.features import cache_complete, cache_image_tokens, cache_name, load_cached
from encoder.model import TGDTModel, checkpoint_digest
from encoder.pipeline import Encoder


@pytest.fixture(scope="module")
def backbone() -> EfficientNetLite0:
    return EfficientNetLite0(BackboneConfig(kind="efficientnet-lite0"))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, size=(96 + 16 * i, 128, 3), dtype=np.uint8)) for i in range(3)]


def _pixels(backbone, images) -> torch.Tensor:
    return torch.stack([backbone.preprocess(im) for im in images])


def _model_config(n: int = 2) -> ModelConfig:
    head = HeadConfig(token_layers=1, global_layers=1, heads=2, global_mlp_hidden=32, dropout=0.0, input_dropout=0.0)
    return ModelConfig(image_backbone=BackboneConfig(kind="efficientnet-lite0", train_layers=n),
                       text_backbone=BackboneConfig(kind="tiny-text", dim=32),
                       embed_dim=32, image_head=head, text_head=head)


@pytest.mark.parametrize("n", [1, 2, 4])
@torch.no_grad()
def test_image_top_at_init_reproduces_the_frozen_cells(backbone, images, n):
    px = _pixels(backbone, images)
    ref = backbone(px)
    mid = backbone.tokens_before_top(px, n)
    assert mid.tokens.shape[1:] == (49, 192)  # every trainable block runs on the 7x7x192 grid
    got = ImageTop(backbone, n).eval()(mid)
    assert got.tokens.shape == ref.tokens.shape == (len(images), 49, 1280)
    assert torch.allclose(got.tokens, ref.tokens, atol=1e-4)
    top = ImageTop(backbone, n)
    assert all(p.requires_grad for p in top.parameters())
    assert not any(p.requires_grad for p in backbone.parameters())  # the copies, not the backbone


@torch.no_grad()
def test_train_mode_keeps_imagenet_batchnorm_statistics_and_drops_connections(backbone, images):
    top = ImageTop(backbone, 2).train()
    assert top.training and all(not m.training for m in top.modules() if isinstance(m, torch.nn.BatchNorm2d))
    mid = backbone.tokens_before_top(_pixels(backbone, images), 2)
    running = top.bn.running_mean.clone()
    torch.manual_seed(0)
    a, b = top(mid).tokens, top(mid).tokens
    assert not torch.equal(a, b)  # stochastic depth in train mode
    assert torch.equal(top.bn.running_mean, running)  # BN statistics untouched
    top.eval()
    assert torch.equal(top(mid).tokens, top(mid).tokens)


@torch.no_grad()
def test_grid_cache_is_fp16_resumable_and_keyed_apart(backbone, images, tmp_path):
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.append(tmp_path / "bad.jpg")
    path = cache_image_tokens(paths, backbone, tmp_path / "g.h5", batch_size=2, workers=0, train_layers=2)
    full = load_cached(path)
    assert full["tokens"].dtype == np.float16 and full["tokens"].shape == (4, 49, 192)
    assert full["ok"].tolist() == [True, True, True, False]
    with h5py.File(path, "a") as f:  # a run killed after the first batch
        f["tokens"][2:] = 0
        f.attrs["done"] = 2
    assert not cache_complete(path)
    cache_image_tokens(paths, backbone, path, batch_size=2, workers=0, train_layers=2)
    assert np.array_equal(load_cached(path)["tokens"], full["tokens"])
    # the fp16 grids still reproduce the backbone's cells (to fp16 rounding)
    got = ImageTop(backbone, 2).eval()(TokenBatch(torch.from_numpy(full["tokens"][:3]).float(), torch.ones(3, 49, dtype=torch.bool)))
    assert torch.allclose(got.tokens, backbone(_pixels(backbone, images)).tokens, atol=5e-2)
    names = {cache_name("image", BackboneConfig(kind="efficientnet-lite0", train_layers=n), ["a"]) for n in (0, 1, 2)}
    assert len(names) == 3


def test_finetuned_checkpoint_encodes_raw_images_like_the_training_path(backbone, images, tmp_path, monkeypatch, refuse_call):
    torch.manual_seed(0)
    model = TGDTModel(_model_config(2), image_dim=1280, text_dim=32, image_grid=(7, 7))
    model.eval().save_pretrained(tmp_path / "init")
    before = {k: v.clone() for k, v in model.image_top.state_dict().items()}
    with torch.no_grad():
        mid = backbone.tokens_before_top(_pixels(backbone, images), 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):  # move image_top (and the head) away from the pretrained weights
        e = model.encode_image_cache(mid)
        loss = (e.global_ @ e.global_.T).sum() - e.tokens.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [k for k, v in model.image_top.state_dict().items() if k.endswith("weight") and not torch.equal(before[k], v)]
    assert moved and any(k.startswith("conv_head") for k in moved) and any(k.startswith("blocks.0") for k in moved)
    model.eval()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        ref = model.encode_image_cache(mid)
    with monkeypatch.context() as m:  # the checkpoint supplies the top: no pretrained load for it
        from efficientnet_lite_pytorch import EfficientNet

        refuse_call(m, EfficientNet, "from_pretrained")
        loaded = TGDTModel.from_pretrained(ckpt)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert checkpoint_digest(ckpt) != checkpoint_digest(tmp_path / "init")
    enc = Encoder.from_pretrained(ckpt, device="cpu")
    got = enc.encode_images(images)
    assert torch.allclose(got.global_, ref.global_, atol=1e-4) and torch.allclose(got.tokens, ref.tokens, atol=1e-4)
    with torch.no_grad():  # the backbone itself now runs the fine-tuned blocks
        assert not torch.allclose(enc.image_backbone(_pixels(backbone, images)).tokens,
                                  backbone(_pixels(backbone, images)).tokens, atol=1e-3)


@pytest.mark.parametrize("kw,match", [
    (dict(kind="efficientnet-lite0", train_layers=5), "at most its last 4 blocks"),
    (dict(kind="tiny-image", train_layers=1), "only for the backbones"),
])
def test_config_refuses_what_cannot_be_trained(kw, match):
    with pytest.raises(ValidationError, match=match):
        BackboneConfig(**kw)


def test_default_config_is_the_frozen_backbone_config_plus_two_image_blocks_and_pooled_global():
    from encoder.cli import DEFAULT_CONFIG

    default = json.loads(DEFAULT_CONFIG.read_text())
    frozen = json.loads((DEFAULT_CONFIG.parent / "frozen_backbones.json").read_text())
    assert default.pop("out") == "runs/default" and frozen.pop("out") == "runs/frozen_backbones"
    assert default["model"].pop("pooled_global") == 1024 and default.pop("pooled_epochs") == 30
    tgdt_global = default  # the default without the pooled towers, as a config of its own
    assert default["model"]["image_backbone"]["train_layers"] == 2
    cfg = TrainConfig.from_file(DEFAULT_CONFIG)
    assert cfg.model.image_backbone.train_layers == 2 and cfg.backbone_lr < cfg.lr and cfg.model.pooled_global
    # the experiments differ from the default in the named fields only
    for name, out, extra in (("token_guided_global", "runs/token_guided_global", {}),
                             ("image_backbone_lr3e-4", "runs/finetune_image_lr3", {"backbone_lr": 3e-4})):
        other = json.loads((DEFAULT_CONFIG.parent / f"{name}.json").read_text())
        assert other.pop("out") == out and all(other.pop(k) == v for k, v in extra.items())
        assert other == tgdt_global, name
    image_layers = default["model"]["image_backbone"].pop("train_layers")
    assert image_layers == 2 and default == frozen
    # the committed default model is the one this config trains
    model_cfg = json.loads((DEFAULT_CONFIG.parents[1] / "default_model" / "config.json").read_text())["model"]
    committed = ModelConfig.model_validate(model_cfg)
    assert committed.image_backbone == cfg.model.image_backbone and committed.pooled_global == cfg.model.pooled_global


def test_train_with_a_trainable_image_top_checkpoints(tmp_path, split_collection):
    from encoder.train import param_groups, train

    data = split_collection(tmp_path / "col", n_train=6, n_val=3)
    cfg = TrainConfig(data=str(data), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), epochs=1,
                      batch_size=3, rerank_k=5, select_k=5, num_threads=2, model=_model_config(1))
    groups = param_groups(TGDTModel(cfg.model, 1280, 32, (7, 7)), cfg)
    assert {g["base_lr"] for g in groups} == {cfg.backbone_lr, cfg.lr}
    ckpt = train(cfg, progress=False)
    with h5py.File(next((tmp_path / "cache").glob("image-*.h5")), "r") as f:
        assert f["tokens"].shape == (9, 49, 192) and f.attrs["train_layers"] == 1
    model = TGDTModel.from_pretrained(ckpt)
    assert model.image_dim == 1280 and model.config.image_backbone.train_layers == 1
    pretrained = ImageTop(EfficientNetLite0(BackboneConfig(kind="efficientnet-lite0")), 1).state_dict()
    assert any(not torch.equal(pretrained[k], v) for k, v in model.image_top.state_dict().items())
