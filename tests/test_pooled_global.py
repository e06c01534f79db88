"""The pooled global towers: what they compute, how they ride in a checkpoint, and how
training adds them after the TGDT branches (also to a finished run)."""
import json

import pytest
import torch
import torch.nn.functional as F

from encoder.backbones import TokenBatch
from encoder.config import TrainConfig
from encoder.heads import PooledTower, pool_tokens
from encoder.model import TGDTModel


def _batch(seed: int = 0, B: int = 5, T: int = 7, D: int = 32) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    return TokenBatch(torch.randn(B, T, D, generator=g) * mask[..., None], mask)


def test_pool_tokens_averages_real_tokens_only():
    tb = _batch()
    poisoned = TokenBatch(tb.tokens + 1e3 * (~tb.mask)[..., None], tb.mask)
    want = torch.stack([tb.tokens[i, tb.mask[i]].mean(0) for i in range(len(tb.mask))])
    assert torch.allclose(pool_tokens(poisoned), want, atol=1e-5)


def test_tower_standardises_with_training_statistics():
    torch.manual_seed(0)
    tower = PooledTower(4, 8, 3).eval()
    x = torch.randn(100, 4) * torch.tensor([1.0, 10.0, 0.1, 5.0]) + torch.tensor([3.0, -2.0, 0.0, 7.0])
    tower.set_statistics(x)
    z = (x - tower.mean) / tower.std
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-5) and torch.allclose(z.std(0), torch.ones(4), atol=1e-4)
    out = tower(x)
    assert torch.allclose(out, F.normalize(tower.net(z), dim=-1)) and torch.allclose(out.norm(dim=-1), torch.ones(100))


def test_attached_towers_serve_the_global_keep_the_tokens_and_round_trip(tmp_path):
    from conftest import tiny_model_config

    torch.manual_seed(0)
    model = TGDTModel(tiny_model_config(), image_dim=32, text_dim=32, image_grid=(4, 4)).eval()
    img = TokenBatch(torch.randn(3, 16, 32), torch.ones(3, 16, dtype=torch.bool))
    txt = _batch(1)
    with torch.no_grad():
        before_i, before_t = model.encode_image_tokens(img), model.encode_text_tokens(txt)
    ti, tt = PooledTower(32, 16, 32).eval(), PooledTower(32, 16, 32).eval()
    ti.set_statistics(torch.randn(50, 32) * 2 + 1)
    model.attach_pooled_global(ti, tt)
    assert model.config.pooled_global == 16
    with torch.no_grad():
        after_i, after_t = model.encode_image_tokens(img), model.encode_text_tokens(txt)
        assert torch.allclose(after_i.global_, ti(pool_tokens(img)))
        assert torch.allclose(after_t.global_, tt(pool_tokens(txt)))
    assert torch.equal(after_i.tokens, before_i.tokens) and torch.equal(after_t.tokens, before_t.tokens)
    assert not torch.allclose(after_i.global_, before_i.global_)
    loaded = TGDTModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert loaded.config.pooled_global == 16 and torch.equal(loaded.image_head.pooled_global.mean, ti.mean)
    with torch.no_grad():
        again = loaded.encode_image_tokens(img)
    assert torch.equal(again.global_, after_i.global_) and torch.equal(again.tokens, after_i.tokens)


def test_training_adds_towers_after_the_tgdt_branches_also_to_a_finished_run(tmp_path, split_collection):
    from conftest import tiny_model_config
    from encoder.train import train

    data = split_collection(tmp_path / "col", n_train=10, n_val=4)
    cfg = TrainConfig(data=str(data), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), epochs=2,
                      batch_size=4, rerank_k=4, select_k=4, num_threads=2, model=tiny_model_config())
    plain = TGDTModel.from_pretrained(train(cfg, progress=False))
    assert plain.config.pooled_global == 0 and plain.image_head.pooled_global is None
    # the same finished run, now asking for towers: the TGDT epochs are not re-run, the towers are added
    cfg2 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pooled_global": 24}), "pooled_epochs": 3})
    model = TGDTModel.from_pretrained(train(cfg2, progress=False))
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2]
    pooled = log["pooled_global"]
    assert [h["epoch"] for h in pooled["history"]] == [1, 2, 3] and 1 <= pooled["best_epoch"] <= 3
    assert pooled["best_rsum"] == max(h["global"] for h in pooled["history"])
    assert model.config.pooled_global == 24 and model.image_head.pooled_global.net[1].out_features == 24
    sd, before = model.state_dict(), plain.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items())  # TGDT weights untouched
    assert {k.split(".pooled_global.")[0] for k in sd if k not in before} == {"image_head", "text_head"}
    # the checkpoint's score is calibrated for the served (pooled) global
    assert log["val"]["global"]["rsum"] >= 0 and 0.0 <= model.config.score.alpha <= 1.0


@pytest.mark.parametrize("bad", [-1, "x"])
def test_config_rejects_a_bad_pooled_width(bad):
    from encoder.config import ModelConfig

    with pytest.raises(ValueError):
        ModelConfig(pooled_global=bad)
