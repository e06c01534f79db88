"""`encoder train-rerank`: train a re-rank head (`encoder.rerank_head`) on a frozen model's own
stage-one candidates, with the loss on the fused score (issue 14, lever B).

Flow: the frozen checkpoint encodes the train and val splits once (`encoder.frozen_cache`) ->
for every train caption, its top-`k` train images by the frozen global score (stage one), its
photo added when stage one missed it; for every train image, its top-`k_i2t` captions plus its
own -> each step scores a batch of queries against their candidates with the fused score
(the frozen global z-scored with the checkpoint's statistics, the head's MrSw z-scored over the
batch's candidates, mixed by `alpha`) and minimises InfoNCE with the positives -> each epoch the
head's val tokens get the fusion re-fitted on val (`refit_fusion`) and the best epoch by val
two-stage rsum is kept (epoch 0, the identity head, competes) -> a checkpoint: the frozen one
plus the head and the re-fitted score. The global path is not touched, so global rsum and stage
one are the frozen model's.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from .config import ScoreConfig, SplitData
from .evaluate import evaluate_embeddings
from .fit_word_weights import refit_fusion
from .frozen_cache import FrozenSplit, encode_split
from .heads import Embeddings
from .init_from import checkpoint_path
from .pipeline import Encoder
from .rerank_head import RerankHead
from .similarity import NEG


class RerankTrainConfig(SplitData):
    checkpoint: str = "default"  # the frozen model ("default": encoder/default_model)
    cache_dir: str = ".cache/rerank"
    out: str = "runs/rerank"
    word_mask: Literal["none", "function"] = "none"  # the new checkpoint's mask, trained with
    word_weight: bool = True  # the head learns a word weight
    hidden: int = Field(0, ge=0)  # the word map: linear (0) or an MLP of this width
    k: int = Field(48, ge=2)  # stage-one candidates per caption
    k_i2t: int = Field(24, ge=0)  # per image (0: caption queries only)
    alpha: float = Field(0.5, gt=0.0, le=1.0)  # the fusion's local weight in the loss
    init_scale: float = Field(5.0, gt=0.0)  # logit scale of the fused score (learned)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    seed: int = 0
    eval_k: int = 100
    num_threads: int | None = None
    max_train_images: int | None = None  # for smoke tests

    @classmethod
    def from_file(cls, path: str | Path) -> "RerankTrainConfig":
        return cls.model_validate(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- candidates and loss
def stage_one(queries: torch.Tensor, gallery: torch.Tensor, relevant, k: int, chunk: int = 4096):
    """Each query's top-`k` non-relevant gallery items by global score plus all its relevant ones.

    `relevant(rows, n)` -> [len(rows), n] bool. Returns (cand [Q, P + k] long, gscore [Q, P + k],
    pos [Q, P + k] bool, valid [Q, P + k] bool); P = the most relevant items any query has, its
    unused slots invalid."""
    Q, N = queries.shape[0], gallery.shape[0]
    k = min(k, N)
    out = []
    for s in range(0, Q, chunk):
        rows = torch.arange(s, min(Q, s + chunk))
        sc = queries[rows].float() @ gallery.float().T
        rel = relevant(rows, N)
        neg_s, neg_i = sc.masked_fill(rel, float("-inf")).topk(k, dim=1)
        out.append((rel, sc, neg_s, neg_i))
    P = max(int(r.sum(1).max()) for r, *_ in out) if out else 0
    cands, gs, pos, valid = [], [], [], []
    for rel, sc, neg_s, neg_i in out:
        # relevant items first (stable order of their ids), padded with invalid slots
        pi = torch.sort((~rel).to(torch.int8), dim=1, stable=True).indices[:, :P]
        pv = rel.gather(1, pi)
        cands.append(torch.cat([pi, neg_i], 1))
        gs.append(torch.cat([sc.gather(1, pi), neg_s], 1))
        pos.append(torch.cat([pv, torch.zeros_like(neg_i, dtype=torch.bool)], 1))
        valid.append(torch.cat([pv, torch.isfinite(neg_s)], 1))
    return torch.cat(cands), torch.cat(gs), torch.cat(pos), torch.cat(valid)


def fused_logits(gscore: torch.Tensor, local: torch.Tensor, valid: torch.Tensor, score: ScoreConfig,
                 alpha: float, scale: torch.Tensor) -> torch.Tensor:
    """The fused score as `similarity.fuse` mixes it: global z-scored with the frozen model's
    statistics, local z-scored over the batch's valid candidates (the head moves its scale)."""
    zg = (gscore - score.global_mean) / score.global_std
    lv = local[valid]
    zl = (local - lv.mean()) / lv.std().clamp(min=1e-6)
    return (scale * ((1.0 - alpha) * zg + alpha * zl)).masked_fill(~valid, NEG)


def multi_positive_nce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """-log(sum over positives / sum over candidates) of softmax(logits), mean over queries."""
    return (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, NEG), 1)).mean()


def text_to_image_local(words: torch.Tensor, word_mask: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """MrSw-sum of each caption against its candidates: words [B, T, D], cells [B, K, S, D] -> [B, K].

    Each word's best cell is found without autograd; the score is then re-computed from the chosen
    cells only, which gives max's (sub)gradient at a fraction of the all-cells backward's cost."""
    B, K, S, D = cells.shape
    with torch.no_grad():
        best = torch.bmm(words.detach(), cells.reshape(B, K * S, D).transpose(1, 2)).view(B, -1, K, S).argmax(-1)
    chosen = cells.reshape(B, K * S, D).gather(
        1, (best.transpose(1, 2) + torch.arange(K)[None, :, None] * S).reshape(B, -1, 1).expand(-1, -1, D))
    sim = (chosen.view(B, K, -1, D) * words[:, None]).sum(-1)  # [B, K, T]
    return (sim * word_mask[:, None, :].to(sim.dtype)).sum(-1)


def image_to_text_local(cells: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """MrSw-sum of each image against its candidate captions: cells [B, S, D], words [B, K, T, D] -> [B, K]
    (best cells found without autograd, as in `text_to_image_local`)."""
    B, K, T, D = words.shape
    with torch.no_grad():
        best = torch.bmm(words.detach().reshape(B, K * T, D), cells.transpose(1, 2)).argmax(-1)  # [B, K*T]
    chosen = cells.gather(1, best[..., None].expand(-1, -1, D)).view(B, K, T, D)
    sim = (chosen * words).sum(-1)
    return (sim * word_mask.to(sim.dtype)).sum(-1)


# ---------------------------------------------------------------- training
def masked_captions(split: FrozenSplit, mask: str) -> Embeddings:
    cap = split.captions
    keep = cap.mask & (split.content[:, :cap.mask.shape[1]] if mask == "function" else True)
    return Embeddings(cap.global_, cap.tokens * keep.unsqueeze(-1).to(cap.tokens.dtype), keep, cap.domain)


def head_words(head: RerankHead, captions: Embeddings, chunk: int = 8192) -> Embeddings:
    """The captions with the head's word tokens (float32), batch by batch."""
    tok = torch.cat([head.text_tokens(captions.tokens[s:s + chunk].float(), captions.mask[s:s + chunk])
                     for s in range(0, len(captions.tokens), chunk)])
    return Embeddings(captions.global_, tok, captions.mask, captions.domain)


def _real_words_first(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the positions of its real words first, cut to the longest row: (index [B, T], mask [B, T])."""
    T = max(1, int(mask.sum(1).max())) if mask.numel() else 1
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :T]
    return idx, mask.gather(1, idx)


def batch_words(head: RerankHead, captions: Embeddings, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's word tokens of `rows` (padding cut): ([B, T, D], [B, T])."""
    idx, m = _real_words_first(captions.mask[rows])
    tok = captions.tokens[rows].float().gather(1, idx[..., None].expand(-1, -1, captions.tokens.shape[-1]))
    return head.text_tokens(tok, m), m


@torch.no_grad()
def val_rsum(head: RerankHead, val: FrozenSplit, score: ScoreConfig, mask: str, k: int):
    """The head on val: fusion re-fitted there, then (fitted score, global rsum, two-stage rsum)."""
    head.eval()
    images = Embeddings(val.images.global_, val.images.tokens.float(), val.images.mask, val.images.domain)
    captions = head_words(head, masked_captions(val, mask))
    fitted = refit_fusion(score.model_copy(update={"word_mask": mask}), images, captions, val.caption_image, k)
    r = evaluate_embeddings(images, captions, val.caption_image, fitted, k=k, modes=("global", "two_stage"))
    return fitted, r["global"]["rsum"], r["two_stage"]["rsum"]


def by_length(order: torch.Tensor, lengths: torch.Tensor, batch: int, pool: int = 16) -> torch.Tensor:
    """A shuffled order re-arranged so each batch holds captions of similar length (little padding
    to compute): sorted by length within pools of `pool` batches, then the batches shuffled."""
    parts = []
    for s in range(0, len(order), batch * pool):
        chunk = order[s:s + batch * pool]
        parts.extend(chunk[torch.argsort(lengths[chunk], stable=True)].split(batch))
    return torch.cat([parts[i] for i in torch.randperm(len(parts)).tolist()]) if parts else order


def _subset(split: FrozenSplit, n: int | None) -> FrozenSplit:
    if n is None or n >= len(split.images.global_):
        return split
    keep = split.caption_image < n
    return FrozenSplit(split.images[:n], split.captions[keep], split.caption_image[keep], split.content[keep],
                       split.ids[keep])


def train_head(cfg: RerankTrainConfig, train: FrozenSplit, score: ScoreConfig, val: FrozenSplit | None = None,
               log=print) -> tuple[RerankHead, dict]:
    """Train a head on `train` (the frozen model's outputs); select the epoch on `val` when given."""
    torch.manual_seed(cfg.seed)
    head = RerankHead(train.images.tokens.shape[-1], cfg.word_weight, cfg.hidden)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(cfg.init_scale)))
    caps = masked_captions(train, cfg.word_mask)
    ci = train.caption_image
    cells_all = train.images.tokens.float()  # once: float16 -> float32 per step costs more than the MrSw
    t0 = time.time()
    t2i = stage_one(caps.global_, train.images.global_, lambda rows, n: ci[rows, None] == torch.arange(n)[None],
                    cfg.k)
    i2t = stage_one(train.images.global_, caps.global_, lambda rows, n: rows[:, None] == ci[None, :n],
                    cfg.k_i2t) if cfg.k_i2t else None
    first = float((t2i[1].masked_fill(~t2i[2], float("-inf")).amax(1)
                   >= t2i[1].masked_fill(t2i[2] | ~t2i[3], float("-inf")).amax(1)).float().mean())
    log(f"stage-one candidates: {time.time() - t0:.0f} s; a caption's photo is stage one's first on "
        f"{100 * first:.1f} % of the train captions")
    params = list(head.parameters()) + [log_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    M, N = len(ci), len(train.images.global_)
    steps_per_epoch = math.ceil(M / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    history, best = [], None

    def select(epoch: int, loss: float | None):
        nonlocal best
        if val is None:
            history.append({"epoch": epoch, "loss": loss})
            best = (epoch, {k: v.detach().clone() for k, v in head.state_dict().items()}, None)
            return
        fitted, g, ts = val_rsum(head, val, score, cfg.word_mask, cfg.eval_k)
        history.append({"epoch": epoch, "loss": loss, "val_global": g, "val_two_stage": ts, "alpha": fitted.alpha,
                        "seconds": round(time.time() - t0, 1)})
        log(history[-1])
        if best is None or ts > best[2]:
            best = (epoch, {k: v.detach().clone() for k, v in head.state_dict().items()}, ts, fitted)

    select(0, None)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        order = by_length(torch.randperm(M), caps.mask.sum(1), cfg.batch_size)
        img_order = torch.randperm(N)
        img_bs = max(1, math.ceil(N / steps_per_epoch))
        losses = []
        for b in range(steps_per_epoch):
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
            for gr in opt.param_groups:
                gr["lr"] = lr
            q = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            scale = log_scale.exp()
            # caption queries: the head's words against the frozen cells of their candidate images
            words, wm = batch_words(head, caps, q)
            cand, gs, pos, valid = (x[q] for x in t2i)
            local = text_to_image_local(words, wm, cells_all[cand])
            loss = multi_positive_nce(fused_logits(gs, local, valid, score, cfg.alpha, scale), pos)
            if i2t is not None:  # image queries: their cells against the head's words of their candidates
                qi = img_order[b * img_bs:(b + 1) * img_bs]
                if len(qi):
                    cand, gs, pos, valid = (x[qi] for x in i2t)
                    used, inv = torch.unique(cand, return_inverse=True)
                    cw, um = batch_words(head, caps, used)
                    local = image_to_text_local(cells_all[qi], cw[inv], um[inv])
                    loss = loss + multi_positive_nce(fused_logits(gs, local, valid, score, cfg.alpha, scale), pos)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
        log(f"epoch {epoch}: loss {sum(losses) / len(losses):.4f} ({time.time() - t0:.0f} s)")
        select(epoch, sum(losses) / len(losses))
    head.load_state_dict(best[1])
    head.eval()
    summary = {"best_epoch": best[0], "history": history, "seconds": round(time.time() - t0, 1),
               "steps": step, "fitted_score": best[3].model_dump() if len(best) > 3 else None}
    summary["train_stage_one_first"] = round(100 * first, 2)
    return head, summary


def train_rerank(cfg: RerankTrainConfig, log=print) -> Path:
    """The whole command: frozen outputs (cached), the head, the checkpoint. Returns its folder."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t0 = time.time()
    src = checkpoint_path(cfg.checkpoint)
    ckpt = None if cfg.checkpoint == "default" else src
    enc = Encoder.from_pretrained(ckpt, device="cpu")
    model = enc.model
    if model.rerank_head is not None:
        raise ValueError(f"{src} already has a re-rank head: start from the model without one")
    if model.config.score.word_weight != "none":
        raise ValueError(f"{src} weights its words (score.word_weight): train the head on a model without")
    train = _subset(encode_split(enc, ckpt, cfg.data, cfg.train_split, cfg.cache_dir, cfg.pairs_file),
                    cfg.max_train_images)
    val = encode_split(enc, ckpt, cfg.data, cfg.val_split, cfg.cache_dir, cfg.pairs_file)
    t_cache = time.time() - t0
    log(f"frozen outputs: {len(train.images.global_)} train images, {len(train.caption_image)} captions "
        f"({t_cache:.0f} s)")
    head, summary = train_head(cfg, train, model.config.score, val, log)
    model.attach_rerank_head(head)
    fitted = ScoreConfig.model_validate(summary["fitted_score"])
    model.config = model.config.model_copy(update={"score": fitted})
    out = Path(cfg.out)
    path = model.save_pretrained(out / "checkpoint")
    doc = {"config": cfg.model_dump(), **summary, "cache_seconds": round(t_cache, 1),
           "total_seconds": round(time.time() - t0, 1)}
    (out / "train_log.json").write_text(json.dumps(doc, indent=2) + "\n")
    return path
