"""Cache of frozen-backbone token features in HDF5, so heads train for many epochs on CPU.

Backbones are frozen, so their outputs are computed once per collection; the cache is keyed
by backbone config and resumable (a `done` counter is advanced after each flushed batch).
With `train_layers` = N > 0 a cache holds what enters the backbone's last N layers instead
(`cache_text_hidden`; `cache_image_tokens(train_layers=N)`), and those layers run, trainable,
in every step.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .backbones import HFText, ImageBackbone, TextBackbone
from .config import BackboneConfig
from .transforms import ImageError, load_image


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], backbone: ImageBackbone):
        self.paths, self.backbone = paths, backbone

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.backbone.preprocess(load_image(self.paths[i])), True
        except ImageError:
            size = getattr(self.backbone, "size", 224)
            return torch.zeros(3, size, size), False


def cache_name(kind: str, cfg: BackboneConfig, items: list[str]) -> str:
    # train_layers = 0 is left out of the key so that caches built before the field existed
    # keep their names (and are reused); any N > 0 gives a different key
    # (likewise token_layer = None)
    conf = cfg.model_dump(exclude={k for k, off in (("train_layers", not cfg.train_layers),
                                                    ("token_layer", cfg.token_layer is None)) if off})
    h = hashlib.sha1(json.dumps([conf, items]).encode()).hexdigest()[:12]
    return f"{kind}-{cfg.kind}-{h}.h5"


ROW_DATASETS = ("tokens", "hidden")  # the per-item dataset whose length is the cache's size


def _rows(f: h5py.File) -> int:
    return next(f[k].shape[0] for k in ROW_DATASETS if k in f)


def cache_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    with h5py.File(path, "r") as f:
        return any(k in f for k in ROW_DATASETS) and int(f.attrs.get("done", 0)) >= _rows(f)


@torch.no_grad()
def cache_image_tokens(paths: list[Path], backbone: ImageBackbone, out: Path, batch_size: int = 32,
                       workers: int = 1, train_layers: int = 0) -> Path:
    """[N, T, D] fp16 token grids for every path (zeros and ok=False for unreadable files):
    the backbone's output, or with `train_layers` = n > 0 the grid entering its last n blocks."""
    n = len(paths)
    with h5py.File(out, "a") as f:
        if "ok" not in f:
            f.create_dataset("ok", (n,), dtype=bool)
            f.attrs["train_layers"] = train_layers
            f.attrs["done"] = 0
        start = int(f.attrs["done"])
        if start >= n:
            return out
        loader = DataLoader(_ImageFiles(paths[start:], backbone), batch_size=batch_size,
                            num_workers=workers, persistent_workers=False)
        pos = start
        for pixels, ok in tqdm(loader, desc="image features", initial=start // batch_size,
                               total=(n + batch_size - 1) // batch_size, unit="batch"):
            tb = backbone.tokens_before_top(pixels, train_layers) if train_layers else backbone(pixels)
            if "tokens" not in f:  # shaped by the first batch: output cells, or the grid entering the top
                T, D = tb.tokens.shape[1:]
                f.create_dataset("tokens", (n, T, D), dtype="f2", chunks=(1, T, D))
            f["tokens"][pos:pos + len(pixels)] = tb.tokens.cpu().numpy().astype(np.float16)
            f["ok"][pos:pos + len(pixels)] = ok.numpy()
            pos += len(pixels)
            f.attrs["done"] = pos
            f.flush()
    return out


@torch.no_grad()
def cache_text_tokens(texts: list[str], backbone: TextBackbone, out: Path, batch_size: int = 256) -> Path:
    """[M, max_tokens, D] fp16 word states plus lengths; batches sorted by length for speed.
    With the backbone's `token_layer`, also `word_states`: the same words at that layer."""
    m = len(texts)
    order = np.argsort([len(t) for t in texts], kind="stable")
    with h5py.File(out, "a") as f:
        if "tokens" not in f:
            f.create_dataset("tokens", (m, backbone.max_tokens, backbone.dim), dtype="f2",
                             chunks=(1, backbone.max_tokens, backbone.dim))
            f.create_dataset("lengths", (m,), dtype="i2")
            if getattr(backbone, "token_layer", None) is not None:  # the token branch's layer too
                f.create_dataset("word_states", (m, backbone.max_tokens, backbone.dim), dtype="f2",
                                 chunks=(1, backbone.max_tokens, backbone.dim))
            f.attrs["done"] = 0
        start = int(f.attrs["done"])
        for b in tqdm(range(start, m, batch_size), desc="text features", unit="batch",
                      initial=start // batch_size, total=(m + batch_size - 1) // batch_size):
            idx = np.sort(order[b:b + batch_size])
            tb = backbone([texts[i] for i in idx])
            T = tb.tokens.shape[1]
            block = np.zeros((len(idx), backbone.max_tokens, backbone.dim), dtype=np.float16)
            block[:, :T] = tb.tokens.cpu().numpy()
            f["tokens"][idx] = block
            if tb.word_states is not None:
                block[:, :T] = tb.word_states.cpu().numpy()
                f["word_states"][idx] = block
            f["lengths"][idx] = tb.mask.sum(1).cpu().numpy()
            f.attrs["done"] = b + len(idx)
            f.flush()
    return out


@torch.no_grad()
def cache_text_hidden(texts: list[str], backbone: HFText, n: int, out: Path, batch_size: int = 256) -> Path:
    """[M, max_tokens + 2, D] fp16 states entering the last `n` layers, every position
    ([CLS]/[SEP] included), plus the attention mask and the word mask (attended, not special)
    that `TextTop` needs; resumable like the other caches, batches sorted by length."""
    m, P = len(texts), backbone.max_tokens + 2
    order = np.argsort([len(t) for t in texts], kind="stable")
    with h5py.File(out, "a") as f:
        if "hidden" not in f:
            f.create_dataset("hidden", (m, P, backbone.dim), dtype="f2", chunks=(1, P, backbone.dim))
            f.create_dataset("attention", (m, P), dtype=bool)
            f.create_dataset("words", (m, P), dtype=bool)
            f.attrs["train_layers"] = n
            f.attrs["done"] = 0
        start = int(f.attrs["done"])
        for b in tqdm(range(start, m, batch_size), desc="text hidden states", unit="batch",
                      initial=start // batch_size, total=(m + batch_size - 1) // batch_size):
            idx = np.sort(order[b:b + batch_size])
            hb = backbone.hidden_before_top([texts[i] for i in idx], n)
            width = hb.hidden.shape[1]
            hidden = np.zeros((len(idx), P, backbone.dim), dtype=np.float16)
            hidden[:, :width] = hb.hidden.cpu().numpy()
            for name, value in (("attention", hb.attention), ("words", hb.words)):
                block = np.zeros((len(idx), P), dtype=bool)
                block[:, :width] = value.cpu().numpy()
                f[name][idx] = block
            f["hidden"][idx] = hidden
            f.attrs["done"] = b + len(idx)
            f.flush()
    return out


def load_cached(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        if int(f.attrs.get("done", 0)) < _rows(f):
            raise RuntimeError(f"feature cache {path} is incomplete; re-run to resume")
        return {k: f[k][()] for k in f.keys()}
