"""Consistent Multimodal Contrastive (CMC) loss of TGDT, with the form of each term in config.

Terms: inter-modal contrast on global vectors; local contrast on MrSw; intra-modal
consistency keeping the image-image and text-text similarity matrices of a batch in
agreement. Each can be InfoNCE (learned temperature) or VSE++ hinge on the hardest negative.
Batches hold each image at most once, so off-diagonal pairs are true negatives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig
from .heads import Embeddings
from .similarity import mrsw


def infonce(scores: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric cross-entropy over a [B, B] score matrix whose diagonal holds the positives."""
    logits = scores * scale
    target = torch.arange(scores.shape[0], device=scores.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def hinge_hardest(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """VSE++: hardest in-batch negative in both directions, margin hinge, averaged."""
    pos = scores.diag()
    off = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    neg = scores.masked_fill(off, float("-inf"))
    i2t = F.relu(margin + neg.max(dim=1).values - pos)
    t2i = F.relu(margin + neg.max(dim=0).values - pos)
    return (i2t + t2i).mean()


def intra_consistency(img_g: torch.Tensor, txt_g: torch.Tensor, margin: float, form: str = "tgdt") -> torch.Tensor:
    """TGDT: sum_j [max_i |S_T[i,j] - S_I[i,j]| - margin]_+ (averaged over j), or plain MSE."""
    s_i = img_g @ img_g.T
    s_t = txt_g @ txt_g.T
    diff = (s_t - s_i).abs()
    if form == "mse":
        return (diff ** 2).mean()
    return F.relu(diff.max(dim=0).values - margin).mean()


def cmc_loss(img: Embeddings, txt: Embeddings, cfg: LossConfig, logit_scale: torch.Tensor,
             local_logit_scale: torch.Tensor, reduce: str = "mean") -> dict[str, torch.Tensor]:
    """All CMC terms for a batch of aligned pairs (row i of img matches row i of txt)."""
    out: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=img.global_.device)
    if cfg.inter_weight:
        g = img.global_ @ txt.global_.T  # [B_img, B_txt]
        out["inter"] = infonce(g, logit_scale.exp().clamp(max=100)) if cfg.form == "infonce" else hinge_hardest(g, cfg.margin)
        total = total + cfg.inter_weight * out["inter"]
    if cfg.local_weight:
        loc = mrsw(txt.tokens, txt.mask, img.tokens, img.mask, reduce).T  # [B_img, B_txt]
        out["local"] = (infonce(loc, local_logit_scale.exp().clamp(max=100)) if cfg.form == "infonce"
                        else hinge_hardest(loc, cfg.margin))
        total = total + cfg.local_weight * out["local"]
    if cfg.intra_weight:
        out["intra"] = intra_consistency(img.global_, txt.global_, cfg.intra_margin, cfg.intra_form)
        total = total + cfg.intra_weight * out["intra"]
    out["total"] = total
    return out
