"""Evaluation in three modes -- global only, two-stage, exhaustive -- from embeddings.

`evaluate_embeddings` is the single implementation: the trainer calls it on cached features
each epoch, `encoder evaluate` on freshly encoded collections, and `--index` on the vectors an
index stores (with that index's FAISS search as stage one).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import ScoreConfig
from .data import Collection
from .heads import Embeddings
from .pipeline import Encoder
from .protocol import ranks_full, ranks_two_stage, recall_table
from .similarity import fuse, global_scores, mrsw_chunked, mrsw_pairs
from .transforms import ImageError, load_image

MODES = ("global", "two_stage", "exhaustive")
# stage one: (query globals, direction "t2i"/"i2t", K) -> (global scores [Q, G], candidates [Q, K])
StageOne = Callable[[torch.Tensor, str, int], tuple[torch.Tensor, torch.Tensor]]


def exact_stage_one(images: Embeddings, captions: Embeddings) -> StageOne:
    def run(q: torch.Tensor, direction: str, k: int):
        gallery = images.global_ if direction == "t2i" else captions.global_
        s = global_scores(q, gallery)
        return s, s.topk(min(k, s.shape[1]), dim=1).indices
    return run


def rerank_candidates(images: Embeddings, captions: Embeddings, cand_t2i: torch.Tensor,
                      cand_i2t: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MrSw of both directions' stage-one candidates: cand_t2i [M, K] image ids per caption and
    cand_i2t [N, K'] caption ids per image -> scores of the same shapes.

    The two lists mostly name the same pairs (a caption whose image ranks it in the top K is
    nearly always in that image's top K too: at K = 100 on Flickr8k's 1K test, every one of
    the 100k image->text pairs is among the 500k text->image ones), so the union is scored
    once with `mrsw_pairs`, where the words are always the caption side.
    """
    M, K1 = cand_t2i.shape
    N, K2 = cand_i2t.shape
    dev = cand_t2i.device
    cap = torch.cat([torch.arange(M, device=dev).repeat_interleave(K1), cand_i2t.reshape(-1)])
    img = torch.cat([cand_t2i.reshape(-1), torch.arange(N, device=dev).repeat_interleave(K2)])
    pairs, back = torch.unique(cap * N + img, return_inverse=True)
    loc = mrsw_pairs(captions.tokens, captions.mask, images.tokens, images.mask,
                     torch.div(pairs, N, rounding_mode="floor"), pairs % N, reduce)[back]
    return loc[:M * K1].view(M, K1), loc[M * K1:].view(N, K2)


def stage_two_inputs(images: Embeddings, captions: Embeddings, stage_one: StageOne, k: int,
                     reduce: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per direction ("t2i", "i2t"): stage one's global scores [Q, G], its K candidates [Q, K]
    and their MrSw [Q, K] -- what fusing, ranking and score calibration all start from."""
    first = {"t2i": stage_one(captions.global_, "t2i", k), "i2t": stage_one(images.global_, "i2t", k)}
    local = rerank_candidates(images, captions, first["t2i"][1], first["i2t"][1], reduce)
    return {d: (s, cand, loc) for (d, (s, cand)), loc in zip(first.items(), local)}


@torch.inference_mode()
def evaluate_embeddings(images: Embeddings, captions: Embeddings, caption_image: torch.Tensor, score: ScoreConfig,
                        k: int = 100, modes: Sequence[str] = MODES, stage_one: StageOne | None = None) -> dict:
    """Metrics per mode, each with R@1/5/10 both ways, rsum, median ranks and `seconds`."""
    stage_one = stage_one or exact_stage_one(images, captions)
    N, M = images.global_.shape[0], captions.global_.shape[0]
    dev = images.global_.device
    gt_t2i = torch.zeros(M, N, dtype=torch.bool, device=dev)
    gt_t2i[torch.arange(M, device=dev), caption_image.to(dev)] = True
    gt_i2t = gt_t2i.T.contiguous()
    results: dict[str, dict] = {}
    if "global" in modes:
        t0 = time.perf_counter()
        s_t2i, _ = stage_one(captions.global_, "t2i", 1)
        s_i2t, _ = stage_one(images.global_, "i2t", 1)
        r = recall_table(ranks_full(s_i2t, gt_i2t), ranks_full(s_t2i, gt_t2i))
        results["global"] = {**r, "seconds": round(time.perf_counter() - t0, 3)}
    if "two_stage" in modes:
        t0 = time.perf_counter()
        parts = stage_two_inputs(images, captions, stage_one, k, score.local_reduce)
        ranks = {}
        for direction, gt in (("t2i", gt_t2i), ("i2t", gt_i2t)):
            s, cand, loc = parts[direction]
            dom = (captions if direction == "t2i" else images).domain
            ranks[direction] = ranks_two_stage(s, cand, fuse(torch.gather(s, 1, cand), loc, score, dom), gt)
        r = recall_table(ranks["i2t"], ranks["t2i"])
        results["two_stage"] = {**r, "k": k, "seconds": round(time.perf_counter() - t0, 3)}
    if "exhaustive" in modes:
        t0 = time.perf_counter()
        s = global_scores(captions.global_, images.global_)
        loc = mrsw_chunked(captions.tokens, captions.mask, images.tokens, images.mask, score.local_reduce)
        t2i = fuse(s, loc, score, captions.domain)  # each query's own re-rank weight
        i2t = fuse(s.T, loc.T, score, images.domain)
        r = recall_table(ranks_full(i2t, gt_i2t), ranks_full(t2i, gt_t2i))
        results["exhaustive"] = {**r, "seconds": round(time.perf_counter() - t0, 3)}
    return results


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
    rest = [torch.cat([p[k] for p in parts])[inv.to(p[k].device)] for k in range(1, len(parts[0]))]
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
