"""`Encoder`: raw images and strings in, separable global + token embeddings out.

Loads the backbones a checkpoint names (from their packages, offline) and the heads from the
checkpoint; the indexer, the service and the evaluation all encode through this one class.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .backbones import ImageBackbone, TextBackbone, TokenBatch, build_image_backbone, build_text_backbone
from .heads import Embeddings
from .model import TGDTModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder:
    def __init__(self, model: TGDTModel, image_backbone: ImageBackbone, text_backbone: TextBackbone,
                 device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.eval().to(self.device)
        self.image_backbone = image_backbone.eval().to(self.device)
        self.text_backbone = text_backbone.eval().to(self.device)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | None = None, device: torch.device | str | None = None) -> "Encoder":
        model = TGDTModel.from_pretrained(checkpoint)
        cfg = model.config
        return cls(model, build_image_backbone(cfg.image_backbone), build_text_backbone(cfg.text_backbone), device)

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @property
    def score_config(self):
        return self.model.config.score

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """CPU-side, picklable work for DataLoader workers."""
        return self.image_backbone.preprocess(img)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> Embeddings:
        tb = self.image_backbone(pixels.to(self.device))
        return self.model.encode_image_tokens(tb)

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> Embeddings:
        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> Embeddings:
        return self.model.encode_text_tokens(self.text_backbone(list(texts)))

    @torch.inference_mode()
    def encode_image_features(self, tb: TokenBatch) -> Embeddings:
        return self.model.encode_image_tokens(tb.to(self.device))

    @torch.inference_mode()
    def encode_text_features(self, tb: TokenBatch) -> Embeddings:
        return self.model.encode_text_tokens(tb.to(self.device))
