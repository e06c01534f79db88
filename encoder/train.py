"""Training of the TGDT heads on cached frozen-backbone features (kept apart from the library).

Flow: read the collection -> cache backbone tokens once (HDF5) -> train heads with the CMC loss
-> evaluate on val each epoch (global + two-stage) -> keep the best epoch by two-stage val
rsum -> calibrate the fused re-rank score on val -> write a checkpoint folder. A `state/`
folder (safetensors + JSON, no pickle) makes a killed run resume where it stopped.
With `train_layers` > 0 a backbone's cache holds what enters its last layers, and their
trainable copies (`model.text_top`, `model.image_top`) train with the heads at `backbone_lr`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from transformers import AutoTokenizer

from .backbones import HiddenBatch, TokenBatch, build_image_backbone, build_text_backbone, minilm_path
from .batches import epoch_batches
from .config import ScoreConfig, TrainConfig
from .data import load_pairs
from .evaluate import evaluate_embeddings, markdown_table
from .features import cache_complete, cache_image_tokens, cache_name, cache_text_hidden, cache_text_tokens, load_cached
from .heads import Embeddings
from .init_from import branches_and_towers, finetune_config, load_source, with_word_mask
from .loss import cmc_loss
from .model import TGDTModel
from .protocol import owners, ranks_in_lists, recall_table
from .ranking import MemoryGallery, candidates, order
from .small_collections import SplitPlan, TooFewPairs, batch_size_for, epochs_for, plan_split
from .train_pooled import pooled_inputs, train_pooled_towers
from .words import caption_content


@dataclass
class Features:
    """All cached tokens of one collection, in memory as fp16.

    The text side is either the frozen backbone's word states (`text_tokens`) or, with
    train_layers > 0, the states entering its trainable top (`text_hidden` + masks).
    """

    image_tokens: torch.Tensor  # [N, Ti, Di] backbone cells, or the grids entering its trainable top
    image_ok: torch.Tensor  # [N] bool
    text_tokens: torch.Tensor | None  # [M, Tt, Dt] word states, or None with text_hidden
    text_lengths: torch.Tensor  # [M] word slots each caption fills in the head's input
    caption_image: torch.Tensor  # [M]
    split: list[str]  # per image
    grid: tuple[int, int]
    text_hidden: torch.Tensor | None = None  # [M, max_tokens + 2, Dt] every position, specials included
    text_attention: torch.Tensor | None = None  # [M, max_tokens + 2] bool
    text_words: torch.Tensor | None = None  # [M, max_tokens + 2] bool
    image_dim: int | None = None  # the backbone's cell width (what the head sees); None = image_tokens' width
    text_content: torch.Tensor | None = None  # [M, max_tokens] bool: content words (model.score.word_mask)
    text_word_states: torch.Tensor | None = None  # [M, Tt, Dt] the token branch's layer (token_layer)
    image_names: list[str] = field(default_factory=list)  # per image, its path in the collection

    @property
    def image_out_dim(self) -> int:
        return int(self.image_dim or self.image_tokens.shape[2])

    @property
    def text_dim(self) -> int:
        return int((self.text_tokens if self.text_tokens is not None else self.text_hidden).shape[2])

    def images(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> TokenBatch:
        x = self.image_tokens[idx].float()
        if flip is not None and bool(flip.any()):
            g0, g1 = self.grid
            xs = x.view(x.shape[0], g0, g1, -1)
            x = torch.where(flip[:, None, None, None], xs.flip(2), xs).view_as(x)
        return TokenBatch(x, torch.ones(x.shape[:2], dtype=torch.bool))

    def texts(self, idx: torch.Tensor) -> TokenBatch | HiddenBatch:
        if self.text_hidden is not None:
            att = self.text_attention[idx]
            P = int(att.sum(1).max().clamp(min=1))  # padding is on the right: cut it
            return HiddenBatch(self.text_hidden[idx, :P].float(), att[:, :P], self.text_words[idx, :P])
        lengths = self.text_lengths[idx]
        T = int(lengths.max().clamp(min=1))
        x = self.text_tokens[idx, :T].float()
        mask = torch.arange(T)[None, :] < lengths[:, None]
        content = None if self.text_content is None else self.text_content[idx, :T] & mask
        ws = None if self.text_word_states is None else self.text_word_states[idx, :T].float()
        return TokenBatch(x, mask, content=content, word_states=ws)


def prepare_features(cfg: TrainConfig) -> Features:
    col = load_pairs(cfg.data, cfg.pairs_file)
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    ib_cfg, tb_cfg = cfg.model.image_backbone, cfg.model.text_backbone
    ipath = cache / cache_name("image", ib_cfg, col.images)
    image_backbone = build_image_backbone(ib_cfg)
    grid, image_dim = image_backbone.grid, image_backbone.dim
    if not cache_complete(ipath):
        cache_image_tokens(col.image_paths, image_backbone, ipath, train_layers=ib_cfg.train_layers)
    del image_backbone
    im = load_cached(ipath)
    feats = Features(
        image_tokens=torch.from_numpy(im["tokens"]), image_ok=torch.from_numpy(im["ok"]),
        text_tokens=None, text_lengths=torch.zeros(0, dtype=torch.long),
        caption_image=torch.tensor(col.caption_image), split=[m.get("split", "") for m in col.meta], grid=grid,
        image_dim=image_dim, image_names=list(col.images),
    )
    del im
    return _with_text(feats, cfg, col.captions, cache)


def _with_text(feats: Features, cfg: TrainConfig, captions: list[str], cache: Path) -> Features:
    """Fill the text side of `feats`: word states, or the states entering the trainable top."""
    tb_cfg = cfg.model.text_backbone
    n = tb_cfg.train_layers
    tpath = cache / cache_name("hidden" if n else "text", tb_cfg, captions)
    if not cache_complete(tpath):
        backbone = build_text_backbone(tb_cfg)
        if n:
            cache_text_hidden(captions, backbone, n, tpath)
        else:
            cache_text_tokens(captions, backbone, tpath)
    tx = load_cached(tpath)
    if cfg.model.score.word_mask != "none" and tb_cfg.kind in ("minilm", "hf-text"):
        tok = AutoTokenizer.from_pretrained(str(minilm_path() if tb_cfg.kind == "minilm" else tb_cfg.path),
                                            local_files_only=True)
        feats.text_content = caption_content(tok, captions, tb_cfg.max_tokens)
    if not n:
        feats.text_tokens = torch.from_numpy(tx["tokens"])
        feats.text_lengths = torch.from_numpy(tx["lengths"].astype(np.int64))
        if tb_cfg.token_layer is not None:
            feats.text_word_states = torch.from_numpy(tx["word_states"])
        return feats
    feats.text_hidden = torch.from_numpy(tx["hidden"])
    feats.text_attention, feats.text_words = torch.from_numpy(tx["attention"]), torch.from_numpy(tx["words"])
    # as backbones._compact counts them: at least one slot, at most max_tokens
    feats.text_lengths = feats.text_words.sum(1).clamp(1, tb_cfg.max_tokens).long()
    return feats


def split_items(feats: Features, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image ids of a split, their caption ids, and caption->local image position."""
    imgs = [i for i, s in enumerate(feats.split) if s == split and bool(feats.image_ok[i])]
    if limit:
        imgs = imgs[:limit]
    pos = torch.full((len(feats.split),), -1, dtype=torch.long)
    imgs = torch.tensor(imgs, dtype=torch.long)
    pos[imgs] = torch.arange(len(imgs))
    caps = torch.nonzero(pos[feats.caption_image] >= 0).squeeze(1)
    return imgs, caps, pos[feats.caption_image[caps]]


def captions_by_image(imgs: torch.Tensor, caps: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A split's images that have captions, and each one's caption ids (from split_items)."""
    caps_of: list[list[int]] = [[] for _ in range(len(imgs))]
    for c, p in zip(caps.tolist(), pos.tolist()):
        caps_of[p].append(c)
    keep = [i for i, c in enumerate(caps_of) if c]
    return imgs[keep], [torch.tensor(caps_of[i], dtype=torch.long) for i in keep]


def image_clusters(feats: Features, imgs: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k-means cluster id of each image, on its L2-normalised mean-pooled backbone cells."""
    pooled = torch.cat([feats.image_tokens[imgs[s:s + 512]].float().mean(1) for s in range(0, len(imgs), 512)])
    x = np.ascontiguousarray(torch.nn.functional.normalize(pooled, dim=-1).numpy(), dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], min(k, len(x)), niter=20, seed=seed, spherical=True)
    km.train(x)
    return torch.from_numpy(km.index.search(x, 1)[1][:, 0].astype(np.int64))


@torch.no_grad()
def embed_split(model: TGDTModel, feats: Features, imgs: torch.Tensor, caps: torch.Tensor,
                batch: int = 256) -> tuple[Embeddings, Embeddings]:
    model.eval()
    ims = [model.encode_image_cache(feats.images(imgs[s:s + batch])) for s in range(0, len(imgs), batch)]
    T = int(feats.text_lengths[caps].max())
    txs = []
    for s in range(0, len(caps), batch):
        e = model.encode_text_cache(feats.texts(caps[s:s + batch]))
        pad = T - e.tokens.shape[1]
        txs.append(Embeddings(e.global_, torch.nn.functional.pad(e.tokens, (0, 0, 0, pad)),
                              torch.nn.functional.pad(e.mask, (0, pad))))
    cat = lambda es: Embeddings(*(torch.cat([getattr(e, f) for e in es]) for f in ("global_", "tokens", "mask")))
    return cat(ims), cat(txs)


@torch.no_grad()
def calibrate_score(images: Embeddings, captions: Embeddings, caption_image: torch.Tensor, k: int,
                    reduce: str, alphas=tuple(np.round(np.linspace(0, 1, 21), 2))) -> tuple[ScoreConfig, dict]:
    """Standardise global and local scores on the stage-one candidates, pick alpha by val rsum.

    The candidates come from the search engine once (`ranking.candidates`); each alpha re-fuses
    and re-orders them (`ranking.order`), exactly as a search with that alpha would."""
    gallery = MemoryGallery(images, captions)
    found = {"t2i": replace(candidates(gallery, captions, True, "image", k, True, reduce), domain=None),
             "i2t": replace(candidates(gallery, images, False, "caption", k, True, reduce), domain=None)}
    gs = torch.cat([c.global_[torch.from_numpy(c.valid)] for c in found.values()])
    ls = torch.cat([c.local[torch.from_numpy(c.valid)] for c in found.values()])
    base = dict(global_mean=float(gs.mean()), global_std=float(gs.std()) or 1.0,
                local_mean=float(ls.mean()), local_std=float(ls.std()) or 1.0, local_reduce=reduce)
    owner = caption_image.cpu().numpy()
    best, table = None, {}
    for a in alphas:
        sc = ScoreConfig(alpha=float(a), **base)
        t2i, i2t = order(found["t2i"], sc, k), order(found["i2t"], sc, k)
        rsum = recall_table(ranks_in_lists(owners(i2t.ids, owner), np.arange(len(images.global_))),
                            ranks_in_lists(t2i.ids, owner))["rsum"]
        table[float(a)] = rsum
        if best is None or rsum > best[1]:
            best = (sc, rsum)
    return best[0], table


def _lr_at(step: int, total: int, cfg: TrainConfig, base: float | None = None) -> float:
    """Linear warmup then cosine decay, from `base` (default: the heads' lr)."""
    base = cfg.lr if base is None else base
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def param_groups(model: TGDTModel, cfg: TrainConfig) -> list[dict]:
    """AdamW groups. Weight decay on matrices only: biases, norms, temperatures and position
    tables are exempt. The backbones' copied top layers start from pretrained weights that a
    head-sized lr would wreck early on, so they get their own, lower `backbone_lr`."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for n, p in model.named_parameters():
        decay = p.ndim >= 2 and n.rsplit(".", 1)[-1] not in ("pos", "row", "col")
        groups.setdefault((n.startswith(("text_top.", "image_top.")), decay), []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
             "base_lr": cfg.backbone_lr if top else cfg.lr} for (top, decay), ps in groups.items()]


def _save_state(state_dir: Path, model: TGDTModel, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Resume point: weights + flattened AdamW moments in safetensors, counters in JSON."""
    tmp = state_dir.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    flat = {}
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                flat[f"{i}.{key}"] = torch.as_tensor(st[key]).detach().contiguous()
    save_file(flat, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    if state_dir.exists():
        for f in state_dir.iterdir():
            f.unlink()
        state_dir.rmdir()
    tmp.rename(state_dir)


def _load_state(state_dir: Path, model: TGDTModel, opt: torch.optim.Optimizer) -> dict:
    model.load_state_dict(load_file(str(state_dir / "model.safetensors")))
    flat = load_file(str(state_dir / "optimizer.safetensors"))
    for i, p in enumerate(model.parameters()):
        if f"{i}.exp_avg" in flat:
            opt.state[p] = {k: flat[f"{i}.{k}"] for k in ("exp_avg", "exp_avg_sq", "step")}
    return json.loads((state_dir / "state.json").read_text())


def _add_pooled_global(model: TGDTModel, feats: Features, cfg: TrainConfig, tr_imgs: torch.Tensor,
                       caps_of: list[torch.Tensor], val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       progress: bool, batch_size: int, init: tuple | None = None) -> dict:
    """Train the pooled global towers on the trained model's pooled backbone outputs, attach
    them. `init`: towers to fine-tune (from `--init-from`) instead of new ones."""
    started = time.time()
    va_imgs, va_caps, va_pos = val
    imgs, caps = torch.cat([tr_imgs, va_imgs]), torch.cat([*caps_of, va_caps])
    image_x = torch.zeros(len(feats.image_ok), feats.image_out_dim)
    image_x[imgs] = pooled_inputs(model, feats, imgs, image=True)
    text_x = torch.zeros(len(feats.caption_image), feats.text_dim)
    text_x[caps] = pooled_inputs(model, feats, caps, image=False)
    inputs_s = time.time() - started
    image, text, log = train_pooled_towers(
        image_x, text_x, tr_imgs, caps_of, va_imgs, va_caps, va_pos, hidden=cfg.model.pooled_global,
        dim=cfg.model.embed_dim, epochs=cfg.pooled_epochs, lr=cfg.pooled_lr, weight_decay=cfg.weight_decay,
        batch_size=batch_size, seed=cfg.seed, progress=progress, init=init)
    model.attach_pooled_global(image, text)
    return {**log, "inputs_seconds": round(inputs_s, 1)}


def _val_rsums(model: TGDTModel, feats: Features, cfg: TrainConfig,
               val: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[float, float, float]:
    """The per-epoch model selection on val: global rsum, two-stage rsum at select_k, its alpha."""
    va_imgs, va_caps, va_pos = val
    ims, txs = embed_split(model, feats, va_imgs, va_caps)
    score, table = calibrate_score(ims, txs, va_pos, cfg.select_k, cfg.model.score.local_reduce,
                                   alphas=(0.0, 0.3, 0.5, 0.7))
    res = evaluate_embeddings(ims, txs, va_pos, score, k=cfg.rerank_k, modes=("global",))
    return res["global"]["rsum"], table[score.alpha], score.alpha


def _split_for_training(feats: Features, cfg: TrainConfig) -> SplitPlan:
    """Give every usable photo its part (train / val), carving val when the collection has none."""
    has_caption = torch.zeros(len(feats.split), dtype=torch.bool)
    has_caption[feats.caption_image] = True
    usable = (feats.image_ok.bool() & has_caption).tolist()
    names = feats.image_names or [str(i) for i in range(len(feats.split))]
    plan = plan_split(names, feats.split, usable, cfg.train_split, cfg.val_split)
    feats.split = plan.splits
    print(plan.describe(), flush=True)
    return plan


def train(cfg: TrainConfig, feats: Features | None = None, progress: bool = True) -> Path:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    source = load_source(cfg.init_from) if cfg.init_from else None
    if source is not None:  # the checkpoint's architecture; the config file keeps the unscaled lrs
        cfg = cfg.model_copy(update={"model": with_word_mask(source.config, cfg.model)})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(cfg.model_dump_json(indent=2))
    if source is not None:
        cfg = finetune_config(cfg, source)
    cache_started = time.time()
    feats = feats or prepare_features(cfg)
    cache_seconds = round(time.time() - cache_started, 1)  # ~0 when the caches already exist
    plan = _split_for_training(feats, cfg)
    tr_imgs, tr_caps, tr_pos = split_items(feats, cfg.train_split, cfg.max_train_images)
    va_imgs, va_caps, va_pos = split_items(feats, cfg.val_split, cfg.max_val_images)
    if len(tr_imgs) < 2 or len(va_imgs) < 1:
        raise TooFewPairs(f"need train and val images; got {len(tr_imgs)} train, {len(va_imgs)} val")
    val = (va_imgs, va_caps, va_pos)
    tr_imgs, caps_of = captions_by_image(tr_imgs, tr_caps, tr_pos)
    bs = batch_size_for(len(tr_imgs), cfg.batch_size)

    torch.manual_seed(cfg.seed)
    towers = None
    if source is not None:
        model, towers = branches_and_towers(source)
    else:
        model = TGDTModel(cfg.model.without_pooled_global(), image_dim=feats.image_out_dim, text_dim=feats.text_dim,
                          image_grid=feats.grid)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    clusters = image_clusters(feats, tr_imgs, cfg.hard_clusters, cfg.seed) if cfg.hard_block else None
    batches = lambda gen: epoch_batches(tr_imgs, caps_of, bs, gen, cfg.captions_per_epoch, clusters, cfg.hard_block)
    steps_per_epoch = sum(1 for _ in batches(torch.Generator().manual_seed(0)))
    epochs = epochs_for(cfg.epochs, steps_per_epoch, cfg.min_steps)
    if (bs, epochs) != (cfg.batch_size, cfg.epochs):
        print(f"{len(tr_imgs)} train photos: batch size {bs}, {epochs} epochs of {steps_per_epoch} steps", flush=True)
    total = steps_per_epoch * epochs
    state_dir = out / "state"
    meta = {"epoch": 0, "best_rsum": -1.0, "history": []}
    if (state_dir / "state.json").is_file():
        meta = _load_state(state_dir, model, opt)
        print(f"resuming after epoch {meta['epoch']}")
    elif source is not None:  # epoch 0: the checkpoint as it is competes in the selection
        g, rsum, alpha = _val_rsums(model, feats, cfg, val)
        meta["history"].append({"epoch": 0, "global": g, "two_stage": rsum, "alpha": alpha, "seconds": 0.0})
        meta["best_rsum"], meta["best_epoch"] = rsum, 0
        model.save_pretrained(out / "best")
        print(f"epoch 0 ({cfg.init_from}): val rsum global {g:.1f} two-stage {rsum:.1f} (alpha {alpha})", flush=True)
    meta.update(init_from=cfg.init_from, data_split=plan.log(), batch_size=bs, epochs=epochs)
    started = time.time() - meta.get("seconds", 0.0)
    for epoch in range(meta["epoch"], epochs):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        bar = tqdm(batches(gen), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not progress, unit="step")
        step = epoch * steps_per_epoch
        for img_idx, cap_idx in bar:
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg, group["base_lr"])
            flip = torch.rand(len(img_idx), generator=gen) < cfg.flip_prob
            img = model.encode_image_cache(feats.images(img_idx, flip))
            txt = model.encode_text_cache(feats.texts(cap_idx))
            losses = cmc_loss(img, txt, cfg.loss, model.logit_scale, model.local_logit_scale,
                              cfg.model.score.local_reduce)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
        g, rsum, alpha = _val_rsums(model, feats, cfg, val)
        meta["history"].append({"epoch": epoch + 1, "global": g, "two_stage": rsum,
                                "alpha": alpha, "seconds": round(time.time() - started, 1)})
        print(f"epoch {epoch + 1}: val rsum global {g:.1f} two-stage {rsum:.1f} (alpha {alpha})", flush=True)
        if rsum > meta["best_rsum"]:
            meta["best_rsum"], meta["best_epoch"] = rsum, epoch + 1
            model.save_pretrained(out / "best")
        meta["epoch"], meta["seconds"] = epoch + 1, time.time() - started
        _save_state(state_dir, model, opt, meta)
    # final: best epoch, fused score calibrated on val with a finer alpha grid
    best = TGDTModel.from_pretrained(out / "best")
    if cfg.model.pooled_global:
        meta["pooled_global"] = _add_pooled_global(best, feats, cfg, tr_imgs, caps_of, val, progress, bs, towers)
    ims, txs = embed_split(best, feats, va_imgs, va_caps)
    score, table = calibrate_score(ims, txs, va_pos, cfg.rerank_k, cfg.model.score.local_reduce)
    score = score.model_copy(update={"word_mask": cfg.model.score.word_mask})  # what the tokens were trained with
    best.config = best.config.model_copy(update={"score": score})
    ckpt = best.save_pretrained(out / "checkpoint")
    res = evaluate_embeddings(ims, txs, va_pos, score, k=cfg.rerank_k, modes=("global", "two_stage"))
    meta.update(alpha_table=table, val=res, train_seconds=round(time.time() - started, 1), cache_seconds=cache_seconds)
    (out / "train_log.json").write_text(json.dumps(meta, indent=2))
    print(markdown_table(res))
    return ckpt
