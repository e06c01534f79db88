"""`encoder train --init-from CHECKPOINT`: fine-tune an existing model instead of starting
from random heads.

Everything the checkpoint trained is fine-tuned: both TGDT heads, the temperatures, the
backbone tops it carries (`train_layers`), and its pooled global towers, which start from the
checkpoint's own (their input standardisation included) rather than from scratch. The
architecture (backbones, widths, `train_layers`, `pooled_global`) is the checkpoint's: the
training config's `model` is replaced by it. The learning rates are the config's times
`finetune_lr_scale` (default 1: on the out-of-domain set's val, 0.2 left the fine-tune well
short after 6 epochs), and epoch 0 (the checkpoint as it is) competes in the model selection on
val, so a fine-tune that does not help on val gives back the checkpoint's weights (with the
fused score re-calibrated on the new val).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .config import ModelConfig, TrainConfig
from .heads import PooledTower
from .model import DEFAULT_CHECKPOINT, CheckpointError, TGDTModel

TOWER_KEY = ".pooled_global."


def checkpoint_path(name: str) -> Path:
    """`default` names the committed default model; anything else is a checkpoint folder."""
    return DEFAULT_CHECKPOINT if name == "default" else Path(name)


@contextmanager
def checkpoint_errors(path: Path):
    """Re-raise what loading a checkpoint folder can raise beyond CheckpointError (a truncated
    or unreadable weights file) as CheckpointError with the reason on one line."""
    try:
        yield
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {' '.join(str(e).split())}") from None


def load_source(name: str) -> TGDTModel:
    """The checkpoint to start from, or CheckpointError with the reason."""
    path = checkpoint_path(name)
    with checkpoint_errors(path):
        return TGDTModel.from_pretrained(path)


def with_word_mask(source: ModelConfig, requested: ModelConfig) -> ModelConfig:
    """The source's architecture, with the training config's word mask when it sets one (a
    fine-tune may teach the token branch to work on content words only), without the source's
    word weights (fitted to its training captions) and without the source's label route: its fusion was fitted to the source's global space and the user's
    own captions now define the domain (`encoder fit-route` can add a route again)."""
    source = source.model_copy(update={"label_route": None, "score": source.score.model_copy(
        update={"word_weight": "none"})})  # word weights are added back after it (`encoder word-weights`)
    if requested.text_backbone.token_layer is not None:  # an experiment's token branch input
        source = source.model_copy(update={"text_backbone": source.text_backbone.model_copy(
            update={"token_layer": requested.text_backbone.token_layer})})
    if "word_mask" not in requested.score.model_fields_set:
        return source
    return source.model_copy(update={"score": source.score.model_copy(
        update={"word_mask": requested.score.word_mask})})


def finetune_config(cfg: TrainConfig, source: TGDTModel) -> TrainConfig:
    """The run's config: the source's architecture, learning rates scaled for fine-tuning."""
    s = cfg.finetune_lr_scale
    return cfg.model_copy(update={"model": with_word_mask(source.config, cfg.model), "lr": cfg.lr * s, "backbone_lr": cfg.backbone_lr * s,
                                  "pooled_lr": cfg.pooled_lr * s})


def branches_and_towers(source: TGDTModel) -> tuple[TGDTModel, tuple[PooledTower, PooledTower] | None]:
    """The source split into what the TGDT epochs train (a model without pooled towers,
    holding the source's weights) and its towers (None when it has none)."""
    config = source.config.without_pooled_global().model_copy(update={"label_route": None})
    config = config.model_copy(update={"score": config.score.model_copy(update={"word_weight": "none"})})
    model = TGDTModel(config, source.image_dim, source.text_dim, source.image_grid, pretrained_tops=False)
    model.load_state_dict({k: v for k, v in source.state_dict().items()
                           if TOWER_KEY not in k and not k.startswith("label_route.") and k != "word_weight_table"})
    towers = None
    if source.image_head.pooled_global is not None:
        towers = (source.image_head.pooled_global, source.text_head.pooled_global)
    return model, towers
