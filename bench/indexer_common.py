"""Shared by the indexer benchmarks: the checkpoint to use (plus the common helpers)."""
from __future__ import annotations

from pathlib import Path

from common import BENCHMARKS, FLICKR, ROOT, machine, write_section  # noqa: F401  (re-exported)


def checkpoint(path: str | None, workdir: Path) -> tuple[str | None, str]:
    """(checkpoint path or None for the default model, a label saying which one was used)."""
    from encoder.model import DEFAULT_CHECKPOINT

    if path:
        return path, f"checkpoint {path}"
    if (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        return None, "the committed default model (encoder/default_model)"
    # No trained model yet: real backbones (EfficientNet-Lite0 + MiniLM) with untrained heads.
    # Costs and byte counts are those of the real model; retrieval quality is not.
    import torch

    from encoder.config import ModelConfig
    from encoder.model import TGDTModel

    torch.manual_seed(0)
    out = workdir / "untrained-real-backbones"
    TGDTModel(ModelConfig(), image_dim=1280, text_dim=384, image_grid=(7, 7)).eval().save_pretrained(out)
    return str(out), "UNTRAINED heads on the real backbones (no default model was committed yet)"
