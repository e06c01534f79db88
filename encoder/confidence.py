"""A calibrated confidence for every hit: Platt scaling of the final score, per search mode.

confidence = sigmoid(a * score + b), where `score` is what a search ranks by (the fused score in
re-rank mode, the global score in global mode). (a, b) is a 1-D logistic regression fitted on
validation results: for every val query, both directions (caption -> images, image ->
captions), its top `TOP` results by that mode's score, labelled 1 when the result is a
ground-truth match. The pairs are stored in the checkpoint's `ScoreConfig`
(`confidence_rerank`, `confidence_global`), so an index built from it, the searcher and the
service all read the same calibration; a checkpoint without them gives no confidence.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import ModelConfig, ScoreConfig
from .data import load_pairs
from .evaluate import encode_collection
from .heads import Embeddings
from .model import CONFIG
from .pipeline import Encoder
from .protocol import owners
from .ranking import MemoryGallery, rank

TOP = 10  # results per query that the fit (and the benchmark) looks at: a typical result page
DEPTH = 100  # stage-one candidates re-ranked per query (the service's default depth)
MODES = ("rerank", "global")


def calibration(score: ScoreConfig, mode: str) -> tuple[float, float] | None:
    """The (a, b) of `mode` ("rerank" / "global"), or None when the checkpoint has none."""
    return score.confidence_rerank if mode == "rerank" else score.confidence_global


def confidence(scores: torch.Tensor, ab: tuple[float, float] | None) -> torch.Tensor | None:
    """sigmoid(a * score + b) elementwise; None without a calibration."""
    if ab is None:
        return None
    return torch.sigmoid(ab[0] * scores.double() + ab[1]).float()


def platt_text(a: float, b: float) -> str:
    """`a * score + b` for people: "1.3654 * score - 4.7283"."""
    return f"{a:.4f} * score {'-' if b < 0 else '+'} {abs(b):.4f}"


def fit_platt(scores: torch.Tensor, labels: torch.Tensor, iters: int = 50) -> tuple[float, float]:
    """1-D logistic regression of `labels` (0/1) on `scores` by Newton's method, with Platt's
    smoothed targets (so perfectly separated data still gives a finite slope)."""
    x = scores.double().reshape(-1)
    y = labels.double().reshape(-1)
    n_pos, n_neg = float(y.sum()), float(y.numel() - y.sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"cannot calibrate: the results hold {int(n_pos)} matches and {int(n_neg)} non-matches "
                         "(both are needed)")
    t = torch.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    mu, sd = x.mean(), x.std().clamp(min=1e-12)
    z = (x - mu) / sd  # fit on a unit scale, then map back
    w = torch.zeros(2, dtype=torch.float64)
    X = torch.stack([z, torch.ones_like(z)], 1)
    for _ in range(iters):
        p = torch.sigmoid(X @ w)
        grad = X.T @ (p - t)
        hess = (X * (p * (1 - p))[:, None]).T @ X + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    a = float(w[0] / sd)
    return a, float(w[1] - a * mu)


@torch.inference_mode()
def top_results(images: Embeddings, captions: Embeddings, caption_image: torch.Tensor, score: ScoreConfig,
                top: int = TOP, depth: int = DEPTH) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per mode, per direction ("t2i": caption queries, "i2t": image queries): (scores [Q, n],
    is-a-match [Q, n]) of every query's top n = min(top, gallery) results, best first, as the
    search engine ranks them (`ranking.rank`: re-rank mode fuses stage one's `depth` candidates)."""
    gallery = MemoryGallery(images, captions)
    owner = caption_image.cpu().numpy()
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {m: {} for m in MODES}
    for direction, queries, kind in (("t2i", captions, "image"), ("i2t", images, "caption")):
        n = min(top, gallery.items[kind].global_.shape[0])
        for mode in MODES:
            r = rank(gallery, score, queries, direction == "t2i", kind, n, depth, rerank=mode == "rerank")
            key = r.ids if direction == "t2i" else owners(r.ids, owner)
            target = owner if direction == "t2i" else np.arange(len(queries.global_))
            out[mode][direction] = (r.score.float(), torch.from_numpy(key == target[:, None]))
    return out


def fit_collections(encoder, collections: Sequence, top: int = TOP, depth: int = DEPTH,
                    workers: int = 1) -> tuple[ScoreConfig, dict]:
    """Encode each collection, pool their top results, fit both modes: the new ScoreConfig and
    a summary (counts and base rates per mode)."""
    pooled: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in MODES}
    score = encoder.score_config
    for col in collections:
        images, captions = encode_collection(encoder, col, workers=workers)
        for mode, res in top_results(images, captions, torch.tensor(col.caption_image), score, top, depth).items():
            pooled[mode].extend(res.values())
    fitted, summary = {}, {}
    for mode in MODES:
        s = torch.cat([p[0].reshape(-1) for p in pooled[mode]])
        y = torch.cat([p[1].reshape(-1) for p in pooled[mode]])
        fitted[f"confidence_{mode}"] = fit_platt(s, y)
        summary[mode] = {"results": int(y.numel()), "matches": int(y.sum()), "a": fitted[f"confidence_{mode}"][0],
                         "b": fitted[f"confidence_{mode}"][1]}
    return score.model_copy(update=fitted), summary


def write_score(checkpoint: str | Path, score: ScoreConfig) -> Path:
    """Rewrite the `score` section of a checkpoint's config.json in place (weights untouched)."""
    path = Path(checkpoint) / CONFIG
    doc = json.loads(path.read_text())
    doc["model"]["score"] = score.model_dump()
    ModelConfig.model_validate(doc["model"])  # never write a config the loader would refuse
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def calibrate(checkpoint: str | Path, data: str | Path, split: str = "val", extras: Sequence[str | Path] = (),
              device: str | None = None, workers: int = 1) -> dict:
    """Fit the confidence of `checkpoint` on `data`'s split (plus each extra collection's) and
    store it in the checkpoint's config.json. Returns the fit summary."""
    if not Path(checkpoint, "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (no config.json)")
    encoder = Encoder.from_pretrained(checkpoint, device=device)
    cols = [load_pairs(d, split=split) for d in [data, *extras]]
    score, summary = fit_collections(encoder, cols, workers=workers)
    write_score(checkpoint, score)
    return summary
