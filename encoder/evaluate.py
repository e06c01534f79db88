"""Evaluation in three modes -- global only, two-stage, exhaustive -- through the search engine.

`evaluate` ranks every caption (text->image) and every image (image->text) with
`encoder.ranking.rank`, the pipeline the service's `Searcher` runs for one query, over a
gallery: a collection held in memory (`MemoryGallery`: training's validation, `encoder
evaluate --data`) or a built index (`encoder evaluate --index`, queries encoded fresh with the
service's text runtime). The protocol (R@K from the ranked lists, a stage-one miss ranking after
K) is `encoder.protocol`. Exhaustive mode (MrSw against every item) is a research mode the
service does not serve; it scores the dense matrices directly.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import ScoreConfig
from .data import Collection
from .heads import Embeddings
from .pipeline import Encoder
from .protocol import owners, ranks_full, ranks_in_lists, recall_table
from .ranking import Gallery, MemoryGallery, Ranked, rank
from .similarity import fuse, global_scores, mrsw_chunked
from .transforms import ImageError, load_image

MODES = ("global", "two_stage", "exhaustive")


@torch.inference_mode()
def evaluate(gallery: Gallery, images: Embeddings, captions: Embeddings, caption_image: torch.Tensor,
             score: ScoreConfig, k: int = 100, modes: Sequence[str] = MODES, image_ids: np.ndarray | None = None,
             caption_ids: np.ndarray | None = None, restrict: bool = False,
             rankings: dict[str, dict[str, Ranked]] | None = None) -> dict:
    """Metrics per mode, each with R@1/5/10 both ways, rsum, median ranks and `seconds`.

    `images` and `captions` are the queries (one per evaluated item); `image_ids` and
    `caption_ids` name the same items in `gallery` (default: positions, a `MemoryGallery` of
    them); `restrict` keeps the search inside those ids (an index holding more than the split).
    `rankings`, when given, receives each mode's ranked lists per direction ("t2i", "i2t").
    """
    N, M = images.global_.shape[0], captions.global_.shape[0]
    image_ids = np.arange(N) if image_ids is None else np.asarray(image_ids, np.int64)
    caption_ids = np.arange(M) if caption_ids is None else np.asarray(caption_ids, np.int64)
    owner = caption_image.cpu().numpy()
    allow = {"image": image_ids, "caption": caption_ids} if restrict else {"image": None, "caption": None}

    def ranks(mode: str, mode_k: int, depth: int, rerank: bool) -> dict[str, np.ndarray]:
        t2i = rank(gallery, score, captions, True, "image", mode_k, depth, rerank, allow["image"])
        i2t = rank(gallery, score, images, False, "caption", mode_k, depth, rerank, allow["caption"])
        if rankings is not None:
            rankings[mode] = {"t2i": t2i, "i2t": i2t}
        t2i_pos = _positions(t2i.ids, image_ids)
        cap_pos = _positions(i2t.ids, caption_ids)
        return {"t2i": ranks_in_lists(t2i_pos, owner), "i2t": ranks_in_lists(owners(cap_pos, owner), np.arange(N))}

    results: dict[str, dict] = {}
    if "global" in modes:  # the same depth as two-stage: a ground truth past it ranks after the K
        t0 = time.perf_counter()
        r = ranks("global", k, k, rerank=False)
        results["global"] = {**recall_table(r["i2t"], r["t2i"]), "seconds": round(time.perf_counter() - t0, 3)}
    if "two_stage" in modes:
        t0 = time.perf_counter()
        r = ranks("two_stage", k, k, rerank=True)
        results["two_stage"] = {**recall_table(r["i2t"], r["t2i"]), "k": k,
                                "seconds": round(time.perf_counter() - t0, 3)}
    if "exhaustive" in modes:
        t0 = time.perf_counter()
        s = global_scores(captions.global_, images.global_)
        loc = mrsw_chunked(captions.tokens, captions.mask, images.tokens, images.mask, score.local_reduce)
        t2i = fuse(s, loc, score, captions.domain)  # each query's own re-rank weight
        i2t = fuse(s.T, loc.T, score, images.domain)
        gt = torch.zeros(M, N, dtype=torch.bool)
        gt[torch.arange(M), caption_image.cpu()] = True
        r = recall_table(ranks_full(i2t.cpu(), gt.T), ranks_full(t2i.cpu(), gt))
        results["exhaustive"] = {**r, "seconds": round(time.perf_counter() - t0, 3)}
    return results


def evaluate_embeddings(images: Embeddings, captions: Embeddings, caption_image: torch.Tensor, score: ScoreConfig,
                        k: int = 100, modes: Sequence[str] = MODES) -> dict:
    """`evaluate` of a collection's embeddings searched in memory, the items themselves the queries."""
    return evaluate(MemoryGallery(images, captions), images, captions, caption_image, score, k, modes)


def _positions(ids: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Gallery ids [Q, w] -> positions in `known` (-1: not one of them, or no id)."""
    if len(known) == 0:
        return np.full(ids.shape, -1)
    order = np.argsort(known, kind="stable")
    srt = known[order]
    at = np.clip(np.searchsorted(srt, ids), 0, len(srt) - 1)
    return np.where((ids >= 0) & (srt[at] == ids), order[at], -1)


# ---------------------------------------------------------------- encoding a collection
class _Images(Dataset):
    def __init__(self, col: Collection, encoder: Encoder):
        self.paths, self.encoder = col.image_paths, encoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.encoder.preprocess(load_image(self.paths[i]))


def stack_embeddings(parts: list[Embeddings], max_tokens: int | None = None) -> Embeddings:
    """Concatenate batches whose token counts differ, padding to the longest."""
    T = max_tokens or max(p.tokens.shape[1] for p in parts)
    toks, masks = [], []
    for p in parts:
        pad = T - p.tokens.shape[1]
        toks.append(torch.nn.functional.pad(p.tokens, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(p.mask, (0, pad)))
    domain = None if any(p.domain is None for p in parts) else torch.cat([p.domain for p in parts])
    return Embeddings(torch.cat([p.global_ for p in parts]), torch.cat(toks), torch.cat(masks), domain)


@torch.inference_mode()
def encode_collection(encoder: Encoder, col: Collection, batch_size: int = 64, workers: int = 1,
                      progress: bool = True) -> tuple[Embeddings, Embeddings]:
    """Encode every image and caption of a collection (images must all be readable)."""
    loader = DataLoader(_Images(col, encoder), batch_size=batch_size, num_workers=workers)
    parts = []
    try:
        for pixels in tqdm(loader, desc="encode images", disable=not progress):
            parts.append(encoder.encode_pixels(pixels))
    except ImageError as e:  # raised inside a worker, re-raised here with its message
        raise ImageError(str(e)) from None
    images = stack_embeddings(parts)
    captions, = texts_by_length(col.captions, lambda t: (encoder.encode_texts(t),), progress=progress)
    return images, captions


def texts_by_length(texts: list[str], encode: Callable[[list[str]], tuple], batch: int = 256,
                    progress: bool = False) -> tuple:
    """`encode` (texts -> (Embeddings, *tensors with a row per text)) over batches of similar
    length (little padding), everything put back in `texts` order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = [encode([texts[i] for i in order[s:s + batch]])
             for s in tqdm(range(0, len(order), batch), desc="encode captions", disable=not progress)]
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    emb = stack_embeddings([p[0] for p in parts])
    rest = [torch.cat([p[k] for p in parts])[inv.to(parts[0][k].device)] for k in range(1, len(parts[0]))]
    return (emb[inv.to(emb.global_.device)], *rest)


def markdown_table(results: dict) -> str:
    head = "| mode | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum | i2t medr | t2i medr | seconds |"
    lines = [head, "|" + "---|" * 11]
    for mode, r in results.items():
        if not isinstance(r, dict) or "rsum" not in r:
            continue
        label = f"{mode} (K={r['k']})" if "k" in r else mode
        lines.append(f"| {label} | {r['i2t_r1']:.1f} | {r['i2t_r5']:.1f} | {r['i2t_r10']:.1f} | {r['t2i_r1']:.1f} | "
                     f"{r['t2i_r5']:.1f} | {r['t2i_r10']:.1f} | **{r['rsum']:.1f}** | {r['i2t_medr']:.0f} | "
                     f"{r['t2i_medr']:.0f} | {r['seconds']:.2f} |")
    return "\n".join(lines)
