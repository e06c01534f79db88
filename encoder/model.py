"""The trained part of the system: two TGDT heads, their temperatures, and checkpoint I/O.

A checkpoint is a folder: `config.json` (ModelConfig, including which backbones it expects)
and `model.safetensors` (heads only, plus `text_top` / `image_top`: a backbone's fine-tuned
last layers when its `train_layers` > 0). Backbones come from their packages, never from the
checkpoint, so a checkpoint is small enough to commit and safe to accept from a user.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbones import HiddenBatch, ImageTop, TextTop, TokenBatch, build_image_top, build_text_top
from .config import ModelConfig, RerankHeadConfig
from .heads import Embeddings, PooledTower, TGDTHead
from . import word_weights
from .label_route import LabelRoute
from .rerank_head import RerankHead

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "default_model"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded, with the reason."""


class TGDTModel(nn.Module):
    def __init__(self, config: ModelConfig, image_dim: int, text_dim: int, image_grid: tuple[int, int],
                 pretrained_tops: bool = True, word_vocab: int = 0):
        super().__init__()
        self.config = config
        self.image_dim, self.text_dim, self.image_grid = image_dim, text_dim, tuple(image_grid)
        d = config.embed_dim
        self.image_head = TGDTHead(image_dim, d, config.image_head, self.image_grid, image_grid[0] * image_grid[1],
                                   config.pooled_global)
        self.text_head = TGDTHead(text_dim, d, config.text_head, None, config.text_backbone.max_tokens,
                                  config.pooled_global)
        init = math.log(1.0 / config.init_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init))
        self.local_logit_scale = nn.Parameter(torch.tensor(init))
        # trainable copies of the backbones' last layers (pretrained init, or bare when a
        # checkpoint supplies them); training only: at inference the Encoder loads them into
        # the backbone, which then runs them itself
        text_cfg, image_cfg = config.text_backbone, config.image_backbone
        self.text_top: TextTop | None = build_text_top(text_cfg, pretrained_tops) \
            if text_cfg.train_layers else None
        self.image_top: ImageTop | None = build_image_top(image_cfg, pretrained_tops) \
            if image_cfg.train_layers else None
        self.label_route = LabelRoute(config.label_route) if config.label_route is not None else None
        rh = config.rerank_head
        self.rerank_head = RerankHead(d, rh.word_weight, rh.hidden) if rh is not None else None
        if config.score.word_weight != "none":  # filled by set_word_weights or the checkpoint
            self.register_buffer("word_weight_table", torch.ones(word_vocab))

    def encode_image_tokens(self, tb: TokenBatch) -> Embeddings:
        """Image head on the full backbone's cells (never runs image_top, as for text), plus
        the label route when the model has one (read from the backbone's `side` logits)."""
        return self.with_route(self.image_head(tb), tb.side, "image")

    def with_route(self, emb: Embeddings, side: torch.Tensor | None, kind: str) -> Embeddings:
        """Append the label route's part to the global vectors (see `encoder.label_route`)."""
        if self.label_route is None:
            return emb
        if side is None:
            raise ValueError(f"this model has a label route: its {kind} backbone must give its side output")
        return self.label_route.extend(emb, self.label_route.route(side, kind), kind)

    def content_words(self, emb: Embeddings, content: torch.Tensor | None, ids: torch.Tensor | None = None) -> Embeddings:
        """Drop function words and punctuation from the caption's tokens when the model's
        `score.word_mask` says so: they then take no part in MrSw nor in the grounding. Then
        scale each word by its prior weight when `score.word_weight` says so (`ids`: the
        words' piece ids, see `encoder.word_weights`); last, the re-rank head's text tokens
        when the model has one (`encoder.rerank_head`)."""
        if self.config.score.word_mask != "none" and content is not None:
            mask = emb.mask & content[:, :emb.mask.shape[1]].to(emb.mask.device)
            emb = Embeddings(emb.global_, emb.tokens * mask.unsqueeze(-1).to(emb.tokens.dtype), mask, emb.domain)
        if self.config.score.word_weight != "none":
            if ids is None:
                raise ValueError("this model weights words by their ids (score.word_weight): the text batch has none")
            emb = Embeddings(emb.global_, word_weights.apply(emb.tokens, emb.mask, ids, self.word_weight_table),
                             emb.mask, emb.domain)
        return emb if self.rerank_head is None else self.rerank_head.text(emb)

    def set_word_weights(self, kind: str, table: torch.Tensor | None) -> None:
        """Weight words by `table` ([vocab], kind "idf") from now on, or not at all ("none")."""
        if hasattr(self, "word_weight_table"):
            del self.word_weight_table
        if kind != "none":
            self.register_buffer("word_weight_table", table.detach().float().clone())
        self.config = self.config.model_copy(update={"score": self.config.score.model_copy(update={"word_weight": kind})})

    def image_cells_from_cache(self, tb: TokenBatch) -> TokenBatch:
        """The backbone's cells from cached ones: cached grids go through image_top first when
        the model has one (they are then the grids entering the backbone's last blocks)."""
        return self.image_top(tb) if self.image_top is not None else tb

    def encode_image_cache(self, tb: TokenBatch) -> Embeddings:
        """The training path, on cached backbone outputs (see image_cells_from_cache)."""
        return self.image_head(self.image_cells_from_cache(tb))

    def encode_text_tokens(self, tb: TokenBatch) -> Embeddings:
        """Text head on the full backbone's word states (never runs text_top: when the model has
        one, the backbone already holds its weights, see `Encoder`), then the word mask and the
        label route."""
        return self.finish_text(self.text_head(tb), tb.side, tb.content, tb.ids)

    def finish_text(self, emb: Embeddings, side: torch.Tensor | None, content: torch.Tensor | None,
                    ids: torch.Tensor | None = None) -> Embeddings:
        """After the text head (torch or ONNX): the word mask and weights, then the label route."""
        return self.with_route(self.content_words(emb, content, ids), side, "text")

    def text_words_from_cache(self, batch: TokenBatch | HiddenBatch) -> TokenBatch:
        """The backbone's word states from cached ones: word states (frozen backbone) as they
        are; hidden states entering the trainable top go through text_top first."""
        if isinstance(batch, HiddenBatch):
            if self.text_top is None:
                raise ValueError("cached hidden states need a model with train_layers > 0")
            return self.text_top(batch)
        return batch

    def encode_text_cache(self, batch: TokenBatch | HiddenBatch) -> Embeddings:
        """The training path, on cached backbone outputs (see text_words_from_cache), with the
        word mask applied as at inference when the batch carries content flags."""
        emb = self.text_head(self.text_words_from_cache(batch))
        if not isinstance(batch, TokenBatch):
            return self.content_words(emb, None)
        return self.content_words(emb, batch.content, batch.ids)

    def attach_rerank_head(self, head: RerankHead) -> None:
        """Re-rank with this head's tokens from now on (see `encoder.train_rerank`)."""
        self.rerank_head = head
        hidden = head.text_map[0].out_features if isinstance(head.text_map, nn.Sequential) else 0
        cfg = RerankHeadConfig(word_weight=head.word_logit is not None, hidden=hidden)
        self.config = self.config.model_copy(update={"rerank_head": cfg})

    def attach_label_route(self, route: LabelRoute) -> None:
        """Serve [global ; label route] from now on (see `encoder.fit_route`)."""
        self.label_route = route
        self.config = self.config.model_copy(update={"label_route": route.cfg})

    def attach_pooled_global(self, image: PooledTower, text: PooledTower) -> None:
        """Serve these towers' vectors as the global embeddings (see `encoder.train_pooled`)."""
        hidden = image.net[1].out_features
        self.image_head.pooled_global, self.text_head.pooled_global = image, text
        self.config = self.config.model_copy(update={"pooled_global": hidden})

    # ------------------------------------------------------------------ I/O
    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"image_dim": self.image_dim, "text_dim": self.text_dim, "image_grid": list(self.image_grid)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
        doc = {"model": self.config.model_dump(), **meta}
        (path / CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, map_location: str | torch.device = "cpu") -> "TGDTModel":
        path = Path(path) if path is not None else DEFAULT_CHECKPOINT
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise CheckpointError(f"{path} is not a checkpoint folder (needs {CONFIG} and {WEIGHTS})")
        try:
            doc = json.loads((path / CONFIG).read_text())
            config = ModelConfig.model_validate(doc["model"])
            state = load_file(str(path / WEIGHTS), device=str(map_location))
            vocab = state["word_weight_table"].numel() if "word_weight_table" in state else 0
            model = cls(config, doc["image_dim"], doc["text_dim"], tuple(doc["image_grid"]), pretrained_tops=False,
                        word_vocab=vocab)
            model.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot load checkpoint {path}: {e}") from None
        return model.eval().to(map_location)


def checkpoint_digest(path: str | Path | None = None) -> str:
    """sha256 of the weights and config: the identity an index records."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        h.update((path / name).read_bytes())
    return h.hexdigest()
