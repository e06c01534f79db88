"""Token store forms: bytes per image and the rsum each costs on the Flickr8k test split.

    .venv/bin/python bench/bench_indexer_tokens.py [--forms fp16 int8 pq64 pq32 pq16] [--checkpoint DIR] [--limit N]

Encodes the test split once, then for every form trains its codec the way `indexer build`
does (a sample of the collection's own tokens), round-trips image and caption tokens through
it and runs the encoder's two-stage evaluation (K=100) on the decoded tokens. Global vectors
are untouched (they live in FAISS and as float32), so the difference is the token form alone.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from indexer_common import FLICKR, checkpoint, machine, write_section  # noqa: E402


def roundtrip(codec, emb, sample: int, rng):
    from encoder.heads import Embeddings

    flat = emb.tokens[emb.mask].numpy()
    if codec.needs_training:
        take = rng.choice(len(flat), size=min(sample, len(flat)), replace=False)
        codec.train(flat[take])
    dec = codec.decode(codec.encode(flat))
    tokens = torch.zeros_like(emb.tokens)
    tokens[emb.mask] = torch.from_numpy(dec)
    return Embeddings(emb.global_, tokens, emb.mask)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forms", nargs="+", default=["fp16", "int8", "pq64", "pq32", "pq16"])
    ap.add_argument("--checkpoint")
    ap.add_argument("--limit", type=int, help="only the first N test images (smoke runs)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--sample", type=int, default=65536, help="token vectors to train a pq codec (as the build)")
    ap.add_argument("--dry-run", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = ap.parse_args()

    from encoder.data import load_pairs
    from encoder.evaluate import encode_collection, evaluate_embeddings
    from encoder.pipeline import Encoder
    from indexer.tokenstore import TokenCodec

    work = Path(tempfile.mkdtemp(prefix="bench-indexer-tokens-"))
    ckpt, label = checkpoint(args.checkpoint, work)
    enc = Encoder.from_pretrained(ckpt)
    col = load_pairs(FLICKR, split="test", limit=args.limit)
    t0 = time.perf_counter()
    images, captions = encode_collection(enc, col, workers=1, progress=False)
    print(f"encoded {len(col)} images in {time.perf_counter() - t0:.0f} s", flush=True)
    gt = torch.tensor(col.caption_image)
    T = images.tokens.shape[1]
    cap_len = float(captions.mask.sum(1).float().mean())
    ref = evaluate_embeddings(images, captions, gt, enc.score_config, k=args.k, modes=("global", "two_stage"))
    rows = [f"| float32 (no store) | {T * 4 * enc.dim:,} | - | {ref['two_stage']['rsum']:.2f} | 0.00 | "
            f"{ref['global']['rsum']:.2f} (global only) |"]
    rng = np.random.default_rng(0)
    for form in args.forms:
        ci, cc = TokenCodec(form, enc.dim), TokenCodec(form, enc.dim)
        t1 = time.perf_counter()
        im2, cap2 = roundtrip(ci, images, args.sample, rng), roundtrip(cc, captions, args.sample, rng)
        codec_s = time.perf_counter() - t1
        r = evaluate_embeddings(im2, cap2, gt, enc.score_config, k=args.k, modes=("two_stage",))["two_stage"]
        loss = ref["two_stage"]["rsum"] - r["rsum"]
        rows.append(f"| {form} | **{ci.row_bytes * T:,}** | {cc.row_bytes * cap_len:,.0f} | {r['rsum']:.2f} | "
                    f"**{loss:+.2f}** | train+encode+decode {codec_s:.1f} s |")
        print(rows[-1], flush=True)
    cmd = "`.venv/bin/python bench/bench_indexer_tokens.py " + " ".join(sys.argv[1:]) + "`"
    body = f"""Command: {cmd}
Machine: {machine()}. Model: {label}.
Flickr8k test split: {len(col)} images x {len(col.captions)} captions; {T} tokens/image, {cap_len:.1f} tokens/caption
on average; two-stage search K={args.k}; rsum loss = float32 rsum - rsum with the decoded tokens.
Goal: <= 2 KB per image at <= 1 rsum loss (fp16 {T}x{enc.dim} = {T * 2 * enc.dim:,} B).

| token form | bytes / image | bytes / caption | two-stage rsum | rsum loss | notes |
|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    print(body)
    if not args.dry_run:
        write_section("Indexer: token store forms (bytes vs rsum)", body)


if __name__ == "__main__":
    main()
