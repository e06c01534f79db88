"""Training on a user's own captions: a collection without split fields trains on a carved,
deterministic val split; too small a collection is refused with the reason; small train sets
get smaller batches and more epochs; --init-from starts from the checkpoint's weights."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.config import TrainConfig
from encoder.model import TGDTModel


def own_collection(root: Path, n: int, seed: int = 0, split: str | None = None) -> Path:
    """`n` generated photos with 1-2 captions each and (by default) no split field: a user's folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "photos").mkdir(parents=True)
    words = ["red", "blue", "dog", "cat", "ball", "beach", "snow", "man", "child", "runs", "sits", "jumps"]
    with (root / "pairs.jsonl").open("w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.jpg")
            caps = [" ".join(rng.choice(words, size=int(rng.integers(3, 7)))) for _ in range(1 + i % 2)]
            rec = {"image": f"photos/p{i}.jpg", "captions": caps}
            f.write(json.dumps({**rec, "split": split} if split else rec) + "\n")
    return root


def tiny_train_config(data: Path, tmp: Path, pooled: int = 0, **kw) -> TrainConfig:
    from conftest import tiny_model_config

    model = tiny_model_config().model_copy(update={"pooled_global": pooled})
    base = dict(data=str(data), cache_dir=str(tmp / "cache"), out=str(tmp / "run"), epochs=1, batch_size=256,
                rerank_k=4, select_k=4, num_threads=2, model=model, pooled_epochs=2)
    return TrainConfig(**{**base, **kw})


def test_collection_without_split_fields_trains_on_a_carved_val_split(tmp_path, capsys):
    from encoder.train import train

    data = own_collection(tmp_path / "mine", 60)
    ckpt = train(tiny_train_config(data, tmp_path, pooled=16), progress=False)
    model = TGDTModel.from_pretrained(ckpt)
    assert model.config.pooled_global == 16
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    split = log["data_split"]
    assert split["carved"] and (split["train_images"], split["val_images"]) == (52, 8)  # 10%, at least 8
    assert len(split["carved_val"]) == 8 and log["val"]["two_stage"]["rsum"] > 0
    # reported, with how big and how chosen
    out = capsys.readouterr().out
    assert "training on 52 photos, validating on 8" in out and "carved 8 photos" in out
    # the batch size adapted to the small train set: at least 4 batches per round, of at least 16
    assert log["batch_size"] == 16


def test_carved_split_is_deterministic_whatever_the_line_order():
    from encoder.small_collections import plan_split

    names = [f"holiday/IMG_{i:04d}.jpg" for i in range(200)]
    usable = [i % 17 != 0 for i in range(200)]  # some unreadable or uncaptioned photos
    a = plan_split(names, [""] * 200, usable)
    order = list(range(200))
    random.Random(1).shuffle(order)
    b = plan_split([names[i] for i in order], [""] * 200, [usable[i] for i in order])
    assert a.carved and a.val == round(0.1 * sum(usable)) and a.val + a.train == sum(usable)
    assert a.val_images == b.val_images  # the same photos, by name, not by position
    val_a = {n for n, s in zip(names, a.splits) if s == "val"}
    assert val_a == set(a.val_images) and not any(s == "val" for s, ok in zip(a.splits, usable) if not ok)
    # adding photos keeps most of the old val photos in val
    more = plan_split(names + [f"new/{i}.jpg" for i in range(20)], [""] * 220, usable + [True] * 20)
    assert len(set(more.val_images) & val_a) >= 0.8 * len(val_a)


def test_split_fields_are_kept_and_a_missing_val_is_carved_from_train():
    from encoder.small_collections import plan_split

    names = [f"{i}.jpg" for i in range(100)]
    full = plan_split(names, ["train"] * 70 + ["val"] * 10 + ["test"] * 20, [True] * 100)
    assert not full.carved and (full.train, full.val, full.unused) == (70, 10, 20)
    assert full.splits[80:] == ["test"] * 20  # the held-out part is never trained on
    no_val = plan_split(names, ["train"] * 80 + ["test"] * 20, [True] * 100)
    assert no_val.carved and (no_val.train, no_val.val, no_val.unused) == (72, 8, 20)
    assert all(no_val.splits[i] == "test" for i in range(80, 100))


def test_too_few_photos_is_a_clear_error(tmp_path):
    from encoder.small_collections import TooFewPairs
    from encoder.train import train

    data = own_collection(tmp_path / "mine", 30)
    with pytest.raises(TooFewPairs, match=r"too few captioned photos to train on: 30 .* at least 40"):
        train(tiny_train_config(data, tmp_path), progress=False)
    only_test = own_collection(tmp_path / "tested", 50, split="test")
    with pytest.raises(TooFewPairs, match="0 readable photos with captions without a 'split' field"):
        train(tiny_train_config(only_test, tmp_path / "t"), progress=False)


def test_small_train_sets_get_smaller_batches_and_more_epochs():
    from encoder.small_collections import batch_size_for, epochs_for

    assert batch_size_for(6000, 256) == 256  # Flickr8k: unchanged
    assert batch_size_for(400, 256) == 100 and batch_size_for(52, 256) == 16 and batch_size_for(10, 256) == 10
    assert batch_size_for(10, 4) == 4
    assert epochs_for(16, 46, 150) == 16  # enough steps already
    assert epochs_for(16, 4, 150) == 38 and epochs_for(16, 1, 150) == 64  # raised, at most 4x
    assert epochs_for(1, 2, 0) == 1  # off


def _tiny_source(tmp_path: Path) -> Path:
    """A trained tiny checkpoint with pooled towers, as --init-from would get it."""
    from encoder.train import train

    data = own_collection(tmp_path / "src_data", 48, seed=1)
    return train(tiny_train_config(data, tmp_path / "src", pooled=16, out=str(tmp_path / "src" / "run")),
                 progress=False)


def test_init_from_starts_every_trained_tensor_at_the_checkpoint(tmp_path, monkeypatch):
    import encoder.train as train_mod

    source_path = _tiny_source(tmp_path)
    source = TGDTModel.from_pretrained(source_path).state_dict()
    seen = {}
    real_groups, real_towers = train_mod.param_groups, train_mod.train_pooled_towers

    def record_groups(model, cfg):
        seen["tgdt"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["lr"] = cfg.lr
        return real_groups(model, cfg)

    def record_towers(*args, init=None, **kw):
        seen["towers"] = [{k: v.clone() for k, v in t.state_dict().items()} for t in init]
        return real_towers(*args, init=init, **kw)

    monkeypatch.setattr(train_mod, "param_groups", record_groups)
    monkeypatch.setattr(train_mod, "train_pooled_towers", record_towers)
    data = own_collection(tmp_path / "mine", 60)
    cfg = tiny_train_config(data, tmp_path, pooled=0, epochs=2, init_from=str(source_path), finetune_lr_scale=0.5)
    tuned = TGDTModel.from_pretrained(train_mod.train(cfg, progress=False))
    # the TGDT branches start at the checkpoint's tensors, all of them
    heads = {k: v for k, v in source.items() if ".pooled_global." not in k}
    assert seen["tgdt"].keys() == heads.keys()
    assert all(torch.equal(seen["tgdt"][k], v) for k, v in heads.items())
    # so do the pooled towers (weights and input statistics), and the architecture is the checkpoint's
    for side, tower in zip(("image_head", "text_head"), seen["towers"]):
        assert all(torch.equal(v, source[f"{side}.pooled_global.{k}"]) for k, v in tower.items())
    assert tuned.config.pooled_global == 16  # the run's config asked for none: the checkpoint's wins
    assert seen["lr"] == pytest.approx(cfg.lr * 0.5)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [0, 1, 2]  # the checkpoint as it is competes on val
    assert log["init_from"] == str(source_path) and log["pooled_global"]["history"][0]["epoch"] == 0


def test_init_from_default_names_the_committed_model_and_splits_off_its_towers():
    from encoder.init_from import branches_and_towers, checkpoint_path, load_source
    from encoder.model import DEFAULT_CHECKPOINT

    assert checkpoint_path("default") == DEFAULT_CHECKPOINT
    source = load_source("default")
    model, towers = branches_and_towers(source)
    assert model.config.pooled_global == 0 and towers is not None
    src = source.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items())
    assert towers[0] is source.image_head.pooled_global and towers[1] is source.text_head.pooled_global
