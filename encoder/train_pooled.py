"""Training the pooled global towers (`ModelConfig.pooled_global`), after the TGDT branches.

The towers read the mean of what the trained model's backbones give at inference, including
any fine-tuned top layers, computed once from the feature caches. They are then trained
with the baseline recipe of seeds.md: symmetric InfoNCE with a learned temperature (init
0.07), AdamW with a one-cycle lr, every train caption once per epoch in batches that hold an
image at most once. The epoch is chosen by val global rsum. Each epoch costs seconds,
against minutes for a TGDT epoch. The TGDT weights are not touched.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from .batches import epoch_batches
from .config import ScoreConfig
from .evaluate import evaluate_embeddings
from .heads import Embeddings, PooledTower, pool_tokens
from .model import TGDTModel


@torch.no_grad()
def pooled_inputs(model: TGDTModel | None, feats, idx: torch.Tensor, image: bool, batch: int = 256) -> torch.Tensor:
    """Mean backbone token of each image / caption in `idx`, as the served model sees it: cached
    grids or hidden states go through the model's trainable tops first (model=None: the
    cached frozen outputs as they are)."""
    if model is not None:
        model.eval()
    out = []
    for s in range(0, len(idx), batch):
        part = idx[s:s + batch]
        tb = feats.images(part) if image else feats.texts(part)
        if model is not None:
            tb = model.image_cells_from_cache(tb) if image else model.text_words_from_cache(tb)
        out.append(pool_tokens(tb))
    return torch.cat(out)


def global_rsum(images: torch.Tensor, captions: torch.Tensor, caption_image: torch.Tensor, table: bool = False):
    """rsum of global-only retrieval under the evaluation protocol (table=True: its whole row)."""
    def only_global(g: torch.Tensor) -> Embeddings:
        return Embeddings(g, g.new_zeros(len(g), 0, g.shape[1]), torch.zeros(len(g), 0, dtype=torch.bool))

    r = evaluate_embeddings(only_global(images), only_global(captions), caption_image, ScoreConfig(),
                            modes=("global",))["global"]
    return r if table else r["rsum"]


def train_pooled_towers(image_x: torch.Tensor, text_x: torch.Tensor, train_images: torch.Tensor,
                        caps_of: list[torch.Tensor], val_images: torch.Tensor, val_caps: torch.Tensor,
                        val_pos: torch.Tensor, hidden: int, dim: int, epochs: int, lr: float, weight_decay: float,
                        batch_size: int, seed: int, progress: bool = True,
                        init: tuple[PooledTower, PooledTower] | None = None) -> tuple[PooledTower, PooledTower, dict]:
    """Towers on pooled inputs (rows of image_x / text_x, indexed by image / caption id); the
    best epoch's by val global rsum, and a log of every epoch. `init`: towers to fine-tune
    (copied, their input statistics kept), which then compete as epoch 0."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tr_caps = torch.cat(caps_of)
    if init is not None:
        towers = copy.deepcopy(torch.nn.ModuleList(init))
    else:
        towers = torch.nn.ModuleList([PooledTower(image_x.shape[1], hidden, dim), PooledTower(text_x.shape[1], hidden, dim)])
        towers[0].set_statistics(image_x[train_images])
        towers[1].set_statistics(text_x[tr_caps])
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*towers.parameters(), logit_scale], lr=lr, weight_decay=weight_decay)
    bs = min(batch_size, len(train_images))
    steps = sum(1 for _ in epoch_batches(train_images, caps_of, bs, torch.Generator().manual_seed(0)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps * epochs))
    best, history, started = None, [], time.time()
    for epoch in range(0 if init is not None else 1, epochs + 1):
        towers.train()
        for img, cap in epoch_batches(train_images, caps_of, bs, gen) if epoch else ():
            logits = logit_scale.exp().clamp(max=100) * towers[1](text_x[cap]) @ towers[0](image_x[img]).T
            labels = torch.arange(len(img))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        towers.eval()
        with torch.no_grad():
            rsum = global_rsum(towers[0](image_x[val_images]), towers[1](text_x[val_caps]), val_pos)
        history.append({"epoch": epoch, "global": round(rsum, 2)})
        if progress:
            print(f"pooled global epoch {epoch}/{epochs}: val rsum {rsum:.1f}", flush=True)
        if best is None or rsum > best[1]:
            best = (epoch, rsum, copy.deepcopy(towers.state_dict()))
    towers.load_state_dict(best[2])
    towers.eval()
    log = {"best_epoch": best[0], "best_rsum": round(best[1], 2), "history": history,
           "seconds": round(time.time() - started, 1)}
    return towers[0], towers[1], log
