"""A word-salience prior for the token re-rank: inverse document frequency of word pieces.

MrSw adds up every word's best cell alike, so a word every caption has ("man", "is",
"wearing") counts as much as the rare word that tells two photos apart ("accordion"). With
`score.word_weight: "idf"` each word's vector is scaled by a weight looked up by its word-piece
id in a table fitted on the training captions (issue 14):

    idf(t) = log((1 + N) / (1 + df(t))) + 1          (N captions, df: captions holding t)
    w(t)   = idf(t) ** power / mean over the training captions' word occurrences of idf ** power

so an average word keeps weight ~1 and a piece never seen in training gets the largest one.
A positive scale does not change which cell a word picks, so the grounding's alignment is
the same and MrSw(sum) becomes sum_t w(t) max_c <word_t, cell_c>; the weighted vectors are what
an index stores, so the indexer, the service and every MrSw kernel need nothing new. The table
is a buffer of the model (`model.safetensors`, key `word_weight_table`): it travels and is
hashed with the checkpoint, and no pickle is involved.
"""
from __future__ import annotations

import torch


def idf_table(ids: torch.Tensor, vocab: int, power: float = 1.0) -> torch.Tensor:
    """[vocab] float32 word weights from the training captions' kept ids ([M, T], 0 = padding):
    smoothed IDF to `power`, divided by its mean over the captions' word occurrences."""
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    M = ids.shape[0]
    if M == 0:
        raise ValueError("no captions to fit word weights on")
    real = ids > 0
    ranked = ids.sort(dim=1).values  # a caption counts once per piece: its first occurrence
    first = torch.ones_like(real)
    first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    df = torch.bincount(ranked[first & (ranked > 0)], minlength=vocab).to(torch.float64)
    idf = (torch.log((1.0 + M) / (1.0 + df)) + 1.0) ** power
    mean = idf[ids[real]].mean() if bool(real.any()) else idf.mean()
    return (idf / mean).to(torch.float32)


def apply(tokens: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Word vectors [B, T, D] scaled by their ids' weights (padding stays zero)."""
    T = tokens.shape[1]
    w = table.to(tokens.device)[ids[:, :T].to(tokens.device).clamp(0, table.numel() - 1)]
    return tokens * (w * mask).unsqueeze(-1).to(tokens.dtype)


def refit_fusion(score, images, captions, caption_image: torch.Tensor, k: int = 100):
    """The fused score's statistics and alpha re-fitted on val embeddings after the word
    weights changed the local scores (the rest of `score` kept; the re-rank confidence, fitted
    on the old scores, is dropped: re-run `encoder calibrate-confidence`)."""
    from .train import calibrate_score

    fitted, _ = calibrate_score(images, captions, caption_image, k, score.local_reduce)
    keep = ("alpha", "global_mean", "global_std", "local_mean", "local_std")
    return score.model_copy(update={**{f: getattr(fitted, f) for f in keep}, "confidence_rerank": None})


def fit_idf(checkpoint: str | None, data: str, out: str, power: float = 1.0, pairs_file: str = "pairs.jsonl"):
    """`encoder word-weights`: a copy of `checkpoint` whose MrSw weights words by the IDF of
    `data`'s train captions, its fusion re-fitted on `data`'s val split; returns the folder."""
    from .data import load_pairs
    from .evaluate import encode_collection
    from .pipeline import Encoder

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
