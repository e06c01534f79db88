"""`Encoder`: raw images and strings in, separable global + token embeddings out.

Loads the backbones a checkpoint names (from their packages, offline) and the heads from the
checkpoint; the indexer, the service and the evaluation all encode through this one class.
A checkpoint with fine-tuned backbone layers (`train_layers` > 0) has them written over the
backbone's last layers here, so every runtime (torch, ONNX for text) runs them unchanged.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from . import onnx_text
from .backbones import (
    EfficientNetLite0,
    HFText,
    ImageBackbone,
    TextBackbone,
    TokenBatch,
    build_image_backbone,
    build_text_backbone,
)
from .heads import Embeddings
from .model import TGDTModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder:
    def __init__(self, model: TGDTModel, image_backbone: ImageBackbone, text_backbone: TextBackbone,
                 device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        if model.text_top is not None:
            if not isinstance(text_backbone, HFText):
                raise ValueError("a checkpoint with fine-tuned text layers needs its transformers text backbone")
            text_backbone.load_top(model.text_top)
        if model.label_route is not None:
            if not isinstance(image_backbone, EfficientNetLite0):
                raise ValueError("a checkpoint with a label route needs the efficientnet-lite0 backbone")
            # before load_top: the route reads the pretrained classifier, not the fine-tuned blocks
            image_backbone.enable_labels(model.config.image_backbone.train_layers)
        if model.image_top is not None:
            if not isinstance(image_backbone, EfficientNetLite0):
                raise ValueError("a checkpoint with fine-tuned image blocks needs the efficientnet-lite0 backbone")
            image_backbone.load_top(model.image_top)
        self.model = model.eval().to(self.device)
        self.image_backbone = image_backbone.eval().to(self.device)
        self.text_backbone = text_backbone.eval().to(self.device)
        self._onnx_text = None

    def set_text_runtime(self, runtime: str, threads: int | None = None) -> str:
        """Run `encode_texts` on "torch", "onnx" or "onnx-int8" (ONNX Runtime, CPU only).

        Returns the runtime in use: an ONNX choice falls back to "torch" on CUDA, for a
        non-transformers text backbone, where onnxruntime is not installed, or when the export fails.
        """
        if runtime not in onnx_text.RUNTIMES:
            raise ValueError(f"text runtime must be one of {onnx_text.RUNTIMES}, not {runtime!r}")
        self._onnx_text = None
        if runtime == "torch" or self.device.type != "cpu" or not isinstance(self.text_backbone, HFText) \
                or not onnx_text.available():
            return "torch"
        try:
            self._onnx_text = onnx_text.OnnxTextEncoder(self.text_backbone, self.model.text_head, threads,
                                                        int8=runtime == "onnx-int8")
        except Exception as e:  # an exotic text model the exporter cannot trace: still serve, on torch
            logging.getLogger(__name__).warning("ONNX export of the text encoder failed (%s); using torch",
                                                str(e).splitlines()[0] if str(e) else type(e).__name__)
            return "torch"
        return runtime

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path | None = None, device: torch.device | str | None = None) -> "Encoder":
        model = TGDTModel.from_pretrained(checkpoint)
        cfg = model.config
        return cls(model, build_image_backbone(cfg.image_backbone), build_text_backbone(cfg.text_backbone), device)

    @property
    def dim(self) -> int:
        """Width of the global vectors (FAISS)."""
        return self.model.config.global_dim

    @property
    def token_dim(self) -> int:
        """Width of the token vectors (the token store)."""
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
        if self._onnx_text is not None:
            emb, side, content, ids = self._onnx_text(list(texts))
            return self.model.finish_text(emb, side, content, ids)
        return self.model.encode_text_tokens(self.text_backbone(list(texts)))

    @torch.inference_mode()
    def encode_image_features(self, tb: TokenBatch) -> Embeddings:
        return self.model.encode_image_tokens(tb.to(self.device))

    @torch.inference_mode()
    def encode_text_features(self, tb: TokenBatch) -> Embeddings:
        return self.model.encode_text_tokens(tb.to(self.device))
