"""`encoder word-weights`: fit the IDF word weights (`encoder.word_weights`) on a collection's
train captions into a copy of a checkpoint, and re-fit its fusion on the val split."""
from __future__ import annotations

import torch

from .data import load_pairs
from .evaluate import encode_collection
from .pipeline import Encoder
from .train import calibrate_score
from .word_weights import idf_table


def refit_fusion(score, images, captions, caption_image: torch.Tensor, k: int = 100):
    """The fused score's statistics and alpha re-fitted on val embeddings after the word
    weights changed the local scores (the rest of `score` kept; the re-rank confidence, fitted
    on the old scores, is dropped: re-run `encoder calibrate-confidence`)."""
    fitted, _ = calibrate_score(images, captions, caption_image, k, score.local_reduce)
    keep = ("alpha", "global_mean", "global_std", "local_mean", "local_std")
    return score.model_copy(update={**{f: getattr(fitted, f) for f in keep}, "confidence_rerank": None})


def fit_idf(checkpoint: str | None, data: str, out: str, power: float = 1.0, pairs_file: str = "pairs.jsonl"):
    """`encoder word-weights`: a copy of `checkpoint` whose MrSw weights words by the IDF of
    `data`'s train captions, its fusion re-fitted on `data`'s val split; returns the folder."""
    enc = Encoder.from_pretrained(checkpoint, device="cpu")
    train = load_pairs(data, pairs_file, split="train")
    val = load_pairs(data, pairs_file, split="val")
    if not train.captions or not val.captions:
        raise ValueError(f"{data} needs train and val splits (split fields) to fit word weights")
    table = idf_table(enc.text_backbone.kept_ids(train.captions), enc.text_backbone.vocab_size, power)
    enc.model.set_word_weights("idf", table)
    images, captions = encode_collection(enc, val)
    score = refit_fusion(enc.model.config.score, images, captions, torch.tensor(val.caption_image))
    enc.model.config = enc.model.config.model_copy(update={"score": score})
    return enc.model.save_pretrained(out)
