"""Issue 14's levers on VAL: word mask x IDF word weight, per checkpoint, side by side.

    .venv/bin/python bench/bench_word_weights.py [--checkpoints default DIR ...] [--powers 0 0.5 1 2]
        [--split val] [--ood /work/ood-data] [--write]

Per checkpoint the `--split` of Flickr8k (and of `--ood`) is encoded once with the checkpoint's
own mask and weights switched off; then, per variant (word mask none / function, IDF power p,
0 = no weights; the table from Flickr8k train captions, `encoder.word_weights`):
- the fused score is re-fitted on the Flickr8k split (`refit_fusion`, as `encoder word-weights`
  and the end of training do) and Flickr8k global / two-stage rsum (K=100) are measured on it;
- word scores of every caption against its own photo: the share of the (positive) summed word
  scores on function words and punctuation, and how often the strongest word is a content word;
- the out-of-domain set's global and two-stage rsum on its split with the same score.
The mosaic pointing game is not here: neither the mask nor a positive word weight changes which
cell a content word picks (`bench/bench_grounding.py --split val` measures it per checkpoint).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine, write_section  # noqa: E402
from encoder.data import load_pairs  # noqa: E402
from encoder.evaluate import encode_collection, evaluate_embeddings  # noqa: E402
from encoder.heads import Embeddings  # noqa: E402
from encoder.pipeline import Encoder  # noqa: E402
from encoder.fit_word_weights import refit_fusion  # noqa: E402
from encoder.word_weights import apply, idf_table  # noqa: E402
from encoder.words import caption_content  # noqa: E402


def variant(captions: Embeddings, content: torch.Tensor, ids: torch.Tensor, mask: str,
            table: torch.Tensor | None) -> Embeddings:
    T = captions.tokens.shape[1]
    keep = captions.mask & (content[:, :T] if mask == "function" else True)
    tokens = captions.tokens * keep.unsqueeze(-1)
    if table is not None:
        tokens = apply(tokens, keep, ids, table)
    return Embeddings(captions.global_, tokens, keep, captions.domain)


def word_shares(images: Embeddings, captions: Embeddings, content: torch.Tensor, caption_image: torch.Tensor):
    """Mean function-word share of the positive word scores, and % strongest word is content."""
    T = captions.tokens.shape[1]
    cells = images.tokens[caption_image]  # [M, S, D]
    best = torch.einsum("mtd,msd->mts", captions.tokens, cells).amax(-1)  # [M, T]
    best = best.masked_fill(~captions.mask, float("-inf"))
    pos = best.clamp(min=0).masked_fill(~captions.mask, 0)
    total = pos.sum(1)
    func = (pos * (~content[:, :T]).float()).sum(1)
    share = torch.where(total > 0, func / total.clamp(min=1e-12), torch.zeros_like(total))
    top = content[:, :T].gather(1, best.argmax(1, keepdim=True)).squeeze(1)
    return 100 * float(share.mean()), 100 * float(top.float().mean())


def encode(enc: Encoder, root: str, split: str):
    col = load_pairs(root, split=split)
    images, captions = encode_collection(enc, col, progress=False)
    tok, max_tokens = enc.text_backbone.tokenizer, enc.model.config.text_backbone.max_tokens
    return (images, captions, torch.tensor(col.caption_image), caption_content(tok, col.captions, max_tokens),
            enc.text_backbone.kept_ids(col.captions))


@torch.inference_mode()
def measure(checkpoint: str | None, args) -> list[dict]:
    enc = Encoder.from_pretrained(checkpoint, device="cpu")
    own = enc.model.config.score
    enc.model.set_word_weights("none", None)  # raw word vectors; each variant applies its own
    enc.model.config = enc.model.config.model_copy(update={"score": enc.model.config.score.model_copy(
        update={"word_mask": "none"})})
    train_ids = enc.text_backbone.kept_ids(load_pairs(args.data, split="train").captions)
    fl = encode(enc, args.data, args.split)
    ood = encode(enc, args.ood, args.split) if args.ood else None
    rows = []
    for mask in args.masks:
        for p in args.powers:
            table = idf_table(train_ids, enc.text_backbone.vocab_size, p) if p > 0 else None
            im, cp, ci, content, ids = fl
            caps = variant(cp, content, ids, mask, table)
            score = refit_fusion(own.model_copy(update={"word_mask": mask}), im, caps, ci)
            r = evaluate_embeddings(im, caps, ci, score, k=100, modes=("global", "two_stage"))
            share, top = word_shares(im, caps, content, ci)
            row = {"checkpoint": checkpoint or "default", "mask": mask, "power": p, "alpha": score.alpha,
                   "global": r["global"]["rsum"], "two_stage": r["two_stage"]["rsum"], "share": share, "top": top}
            if ood is not None:
                oim, ocp, oci, ocontent, oids = ood
                ro = evaluate_embeddings(oim, variant(ocp, ocontent, oids, mask, table), oci, score, k=100,
                                         modes=("global", "two_stage"))
                row.update(ood_global=ro["global"]["rsum"], ood_two_stage=ro["two_stage"]["rsum"])
            rows.append(row)
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=["default"])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--ood", default=None, help="an out-of-domain pairs.jsonl folder (bench/ood_devset.py)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--masks", nargs="+", default=["none", "function"], choices=["none", "function"])
    ap.add_argument("--powers", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    for d in [args.data] + ([args.ood] if args.ood else []):
        if not Path(d).is_dir():
            print(f"bench_word_weights: no collection at {d}", file=sys.stderr)
            return 2
    torch.set_num_threads(2)
    rows = [r for ck in args.checkpoints for r in measure(None if ck == "default" else ck, args)]
    lines = ["| checkpoint | word mask | IDF power | alpha | global | two-stage | two-stage - global | "
             "function share | strongest is content | OOD global | OOD two-stage |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['mask']} | {r['power']:g} | {r['alpha']:.2f} | {r['global']:.1f} | "
                     f"{r['two_stage']:.1f} | {r['two_stage'] - r['global']:+.1f} | {r['share']:.1f} % | "
                     f"{r['top']:.1f} % | {r.get('ood_global', float('nan')):.1f} | "
                     f"{r.get('ood_two_stage', float('nan')):.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd = "bench/bench_word_weights.py " + " ".join(sys.argv[1:])
        write_section(f"Word weights and word mask on Flickr8k {args.split} (issue 14)",
                      f"Machine: {machine()}; command: `.venv/bin/python {cmd}`.\n"
                      f"Fusion re-fitted on the Flickr8k {args.split} split per row; IDF from Flickr8k train "
                      f"captions; word shares over every {args.split} caption against its own photo.\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
