"""The open-vocabulary label route: ImageNet class names as a bridge into the text backbone's
sentence space (ConSE, Norouzi et al., ICLR 2014), appended to the trained global vectors.

An image's label vector is the convex combination of the class names' sentence embeddings,
weighted by the *pretrained* EfficientNet classifier's top-T softmax; a caption's is its own
MiniLM sentence embedding (mean-pooled, as the package was trained to be used). Both live in
one 384-d space without any training, which is what keeps search working far from Flickr8k.

Each item's vector becomes [g ; sqrt(w) * (l - centre)]: the inner product of two items is
their trained global score plus sqrt(w_a * w_b) times their centred label cosine, so stage one
stays one FAISS search and one stored vector serves as query and as gallery entry. w is the
item's label weight, high far from the training data and low near it (`LabelRouteConfig`);
the same in-domain-ness `domain` (1 near, 0 far) also sets the query's token re-rank weight
(`ScoreConfig.alpha_for`), so an out-of-domain query is not re-ranked by tokens that know
nothing of its words.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import LabelRouteConfig
from .heads import Embeddings

CLASSES_FILE = Path(__file__).resolve().parent / "label_data" / "imagenet1k.tsv"


def imagenet_classes(path: Path = CLASSES_FILE) -> list[tuple[str, list[str], str]]:
    """(synset, lemmas, definition) of the 1,000 ImageNet classes, in the classifier's output order."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        synset, lemmas, definition = line.split("\t")
        rows.append((synset, [x.strip() for x in lemmas.split(",") if x.strip()], definition))
    return rows


def class_prompts(cfg: LabelRouteConfig) -> list[list[str]]:
    """Per class, the prompts whose sentence embeddings are averaged into its name vector
    (`{}` is a lemma, `{definition}` the class's WordNet definition)."""
    return [[cfg.prompt.format(lemma, definition=d) for lemma in lemmas[:cfg.lemmas]]
            for _, lemmas, d in imagenet_classes()]


class LabelRoute(nn.Module):
    """Holds the route's data (all buffers, saved in the checkpoint's safetensors):
    class-name vectors [classes, S], the training means of both sides' label vectors, and the
    banks of training items' label vectors that measure in-domain-ness."""

    def __init__(self, cfg: LabelRouteConfig):
        super().__init__()
        self.cfg = cfg
        S = cfg.sentence_dim
        self.register_buffer("class_vectors", torch.zeros(cfg.classes, S))
        self.register_buffer("text_centre", torch.zeros(S))
        self.register_buffer("image_centre", torch.zeros(S))
        self.register_buffer("text_bank", torch.zeros(cfg.text_bank, S))
        self.register_buffer("image_bank", torch.zeros(cfg.image_bank, S))

    # ------------------------------------------------------------------ label vectors
    def image_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Classifier logits [B, classes] -> unit label vectors [B, S] (top-T softmax mix)."""
        p = torch.softmax(logits.float() / self.cfg.temperature, dim=-1)
        top = p.topk(min(self.cfg.top_t, p.shape[-1]), dim=-1)
        w = top.values / top.values.sum(-1, keepdim=True)
        mix = torch.einsum("bt,btd->bd", w, self.class_vectors[top.indices])
        return F.normalize(mix, dim=-1)

    @staticmethod
    def text_labels(sentence: torch.Tensor) -> torch.Tensor:
        return F.normalize(sentence.float(), dim=-1)

    # ------------------------------------------------------------------ adaptivity
    def domain(self, labels: torch.Tensor, kind: str) -> torch.Tensor:
        """In-domain-ness in [0, 1]: mean of the top cosines to the training bank, ramped."""
        bank = self.text_bank if kind == "text" else self.image_bank
        lo, hi = (self.cfg.text_lo, self.cfg.text_hi) if kind == "text" else (self.cfg.image_lo, self.cfg.image_hi)
        near = (labels @ bank.T).topk(min(self.cfg.bank_top, bank.shape[0]), dim=-1).values.mean(-1)
        return ((near - lo) / max(hi - lo, 1e-6)).clamp(0.0, 1.0)

    def weight(self, domain: torch.Tensor) -> torch.Tensor:
        return self.cfg.weight_out + (self.cfg.weight_in - self.cfg.weight_out) * domain

    def extend(self, emb: Embeddings, labels: torch.Tensor, kind: str) -> Embeddings:
        """[g ; sqrt(w) * (l - centre)] as the global vector, and the item's domain."""
        labels = labels.to(emb.global_.device)
        d = self.domain(labels, kind)
        centre = self.text_centre if kind == "text" else self.image_centre
        part = self.weight(d).clamp(min=0).sqrt()[:, None] * (labels - centre)
        return replace(emb, global_=torch.cat([emb.global_.float(), part], dim=-1).to(emb.global_.dtype), domain=d)

    def route(self, side: torch.Tensor, kind: str) -> torch.Tensor:
        """The backbone's side output (image: classifier logits; text: sentence vector) -> label vectors."""
        return self.image_labels(side) if kind == "image" else self.text_labels(side)
