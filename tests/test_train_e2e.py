"""A few training steps on a handful of real Flickr8k pairs, with real backbones; then resume."""
import json

import torch

from encoder.config import HeadConfig, TrainConfig
from encoder.model import TGDTModel


def test_train_few_steps_on_real_pairs_and_resume(flickr8k, tmp_path):
    from encoder.train import train

    lines = [json.loads(l) for l in (flickr8k / "pairs.jsonl").read_text().splitlines()]
    train_l = [l for l in lines if l["split"] == "train"][:12]
    val_l = [l for l in lines if l["split"] == "val"][:6]
    with (tmp_path / "pairs.jsonl").open("w") as f:
        for l in train_l + val_l:
            f.write(json.dumps({**l, "image": str(flickr8k / l["image"])}) + "\n")
    head = HeadConfig(token_layers=1, global_layers=1, heads=2, global_mlp_hidden=32)
    cfg = TrainConfig(data=str(tmp_path), cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"), epochs=1,
                      batch_size=6, rerank_k=5, num_threads=2)
    cfg.model.embed_dim = 32
    cfg.model.image_head = head
    cfg.model.text_head = head
    ckpt = train(cfg, progress=False)
    model = TGDTModel.from_pretrained(ckpt)
    assert model.image_dim == 1280 and model.text_dim == 384 and model.image_grid == (7, 7)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["epoch"] == 1 and log["history"][0]["two_stage"] > 0
    assert set(log["val"]) == {"global", "two_stage"}
    # resume: a second run with more epochs continues from the saved state, not from scratch
    cfg2 = cfg.model_copy(update={"epochs": 2})
    train(cfg2, progress=False)
    log2 = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [h["epoch"] for h in log2["history"]] == [1, 2]
    assert log2["history"][0] == log["history"][0]
    assert 0.0 <= TGDTModel.from_pretrained(tmp_path / "run" / "checkpoint").config.score.alpha <= 1.0
    assert torch.isfinite(model.logit_scale)


def test_hard_negative_batches_group_look_alikes_and_stay_true_negatives():
    from encoder.batches import epoch_batches, hard_order

    clusters = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    gen = torch.Generator().manual_seed(0)
    order = hard_order(clusters, 4, gen)
    assert sorted(order.tolist()) == list(range(20))  # a permutation
    # cut back into its blocks: each block holds one cluster only
    runs, prev = [], None
    for i in order.tolist():
        c = int(clusters[i])
        if c != prev or len(runs[-1]) == 4:
            runs.append([])
        runs[-1].append(i)
        prev = c
    assert all(len({int(clusters[i]) for i in r}) == 1 for r in runs)
    caps_of = [torch.tensor([100 + i, 200 + i]) for i in range(20)]
    images = torch.arange(20) + 1000
    batches = list(epoch_batches(images, caps_of, 8, gen, rounds=1, clusters=clusters, block=4))
    assert len(batches) == 2
    for imgs, caps in batches:
        assert len(set(imgs.tolist())) == 8  # an image at most once per batch
        assert all(int(c) % 100 == int(i) - 1000 for i, c in zip(imgs, caps))  # captions stay with their image
