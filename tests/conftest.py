"""Shared fixtures: a tiny random checkpoint (fast, no real backbones) and the real data root."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from encoder.config import BackboneConfig, HeadConfig, ModelConfig
from encoder.model import TGDTModel

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLICKR = SHARED / "data" / "flickr8k"


def tiny_model_config(dim: int = 32) -> ModelConfig:
    head = HeadConfig(token_layers=1, global_layers=1, heads=2, global_mlp_hidden=64)
    return ModelConfig(
        image_backbone=BackboneConfig(kind="tiny-image", dim=dim),
        text_backbone=BackboneConfig(kind="tiny-text", dim=dim, max_tokens=16),
        embed_dim=dim, image_head=head, text_head=head,
    )


def make_tiny_checkpoint(path: Path, dim: int = 32, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    model = TGDTModel(tiny_model_config(dim), image_dim=dim, text_dim=dim, image_grid=(4, 4))
    return model.eval().save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    if not (FLICKR / "pairs.jsonl").is_file():
        pytest.skip(f"real data not available: {FLICKR} is absent (../shared is not beside the checkout)")
    return FLICKR


@pytest.fixture()
def tiny_collection(tmp_path) -> Path:
    """A 6-image pairs.jsonl collection of generated JPEGs, 2 captions each."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "col"
    (root / "images").mkdir(parents=True)
    words = ["red", "blue", "green", "dog", "cat", "ball", "beach", "snow", "man", "child", "runs", "sits"]
    with (root / "pairs.jsonl").open("w") as f:
        for i in range(6):
            arr = rng.integers(0, 255, size=(48 + 8 * i, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "images" / f"img{i}.jpg")
            caps = [" ".join(rng.choice(words, size=5)) for _ in range(2)]
            f.write(json.dumps({"image": f"images/img{i}.jpg", "captions": caps, "split": "test", "n": i}) + "\n")
    return root


@pytest.fixture()
def messy_collection(tiny_collection) -> Path:
    """The tiny collection plus a corrupt file and a byte-identical duplicate (order-dependent cases)."""
    root = tiny_collection
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    shutil.copyfile(root / "images" / "img1.jpg", root / "images" / "copy_of_1.jpg")
    with (root / "pairs.jsonl").open("a") as f:
        f.write(json.dumps({"image": "images/broken.jpg", "captions": ["nothing to see"], "split": "test"}) + "\n")
        f.write(json.dumps({"image": "images/copy_of_1.jpg", "captions": ["same photo again"], "split": "test"}) + "\n")
    return root


def _split_collection(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    """Generated JPEGs with train and val splits, 2 captions each, for small training runs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    words = ["red", "blue", "dog", "cat", "ball", "beach", "snow", "man", "child", "runs", "sits", "jumps"]
    with (root / "pairs.jsonl").open("w") as f:
        for i in range(n_train + n_val):
            Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
            caps = [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) for _ in range(2)]
            f.write(json.dumps({"image": f"images/{i}.jpg", "captions": caps,
                                "split": "train" if i < n_train else "val"}) + "\n")
    return root


@pytest.fixture()
def split_collection():
    return _split_collection


def _mrsw_one(query, query_mask, cand, cand_mask, query_is_text: bool, reduce: str = "mean"):
    """Reference MrSw of one query [T, D] against K padded candidates [K, S, D] -> [K]
    (words are the caption side, whichever side is the query), from the all-pairs `mrsw`."""
    from encoder.similarity import mrsw

    if query_is_text:
        return mrsw(query[None], query_mask[None], cand, cand_mask, reduce)[0]
    return mrsw(cand, cand_mask, query[None], query_mask[None], reduce)[:, 0]


@pytest.fixture()
def mrsw_one():
    return _mrsw_one


def _refuse_call(patcher: pytest.MonkeyPatch, owner: object, name: str) -> None:
    """Make `owner.name` fail the test if called (e.g. a pretrained load a checkpoint makes moot)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{getattr(owner, '__name__', owner)}.{name} was called")

    patcher.setattr(owner, name, refuse)


@pytest.fixture()
def refuse_call():
    return _refuse_call
