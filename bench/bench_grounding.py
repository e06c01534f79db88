"""Grounding on a Flickr8k split (test unless --split), per checkpoint, side by side (issue 14).

    .venv/bin/python bench/bench_grounding.py [--checkpoints default DIR ...] [--n 300] [--split val] [--write]

Per checkpoint, on the same `n` random test captions (seeded):
- share of the summed word scores (each word's best cell in its own photo) on punctuation and
  function words, and how often the strongest word is a content word -- "served" (the words the
  model scores, as it scores them: its `score.word_mask` and `score.word_weight`) and "all
  words" (every word token, unweighted, mask or not);
- mosaic pointing game: the caption's photo among 3 other test photos in a 2x2 mosaic
  (`encoder.grounding`); accuracy = share of content words whose best cell lies in that photo;
  chance = the photo's share of the grid.
`--write` appends the table to BENCHMARKS.md with machine, date and command.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine, write_section  # noqa: E402
from encoder.data import load_pairs  # noqa: E402
from encoder.grounding import MosaicLayout, function_share, pointing_hits, word_scores  # noqa: E402
from encoder.pipeline import Encoder  # noqa: E402
from encoder.transforms import load_image  # noqa: E402


def mosaic_picks(col, n: int, seed: int) -> list[dict]:
    """`n` seeded picks: a photo, one of its captions, 3 other photos and the photo's mosaic slot."""
    caps_of: dict[int, list[str]] = {}
    for c, i in zip(col.captions, col.caption_image):
        caps_of.setdefault(i, []).append(c)
    rng = random.Random(seed)
    picks = []
    for _ in range(n):
        img = rng.randrange(len(col.images))
        others = rng.sample([i for i in range(len(col.images)) if i != img], 3)
        picks.append({"image": img, "caption": rng.choice(caps_of[img]), "others": others, "slot": rng.randrange(4)})
    return picks


@torch.inference_mode()
def measure(checkpoint: str | None, col, picks, layout: MosaicLayout) -> dict:
    enc = Encoder.from_pretrained(checkpoint, device="cpu")
    model = enc.model
    served_share, all_share, served_top, all_top, hits, words = [], [], 0, 0, 0, 0
    for b in range(0, len(picks), 32):
        chunk = picks[b:b + 32]
        own = [load_image(col.image_paths[p["image"]]) for p in chunk]
        mosaics = []
        for p in chunk:
            photos = [load_image(col.image_paths[i]) for i in p["others"]]
            photos.insert(p["slot"], load_image(col.image_paths[p["image"]]))
            mosaics.append(layout.compose(photos))
        cells = enc.encode_images(own + mosaics)
        tb = enc.text_backbone([p["caption"] for p in chunk])
        head_out = model.text_head(tb)
        served_emb = model.content_words(head_out, tb.content, tb.ids)  # what MrSw scores
        # every word token, before the word mask and weights (after a re-rank head: its words)
        raw = head_out if model.rerank_head is None else model.rerank_head.text(head_out)
        for j, p in enumerate(chunk):
            m = raw.mask[j]
            content = tb.content[j][m] if tb.content is not None else torch.ones(int(m.sum()), dtype=torch.bool)
            _, sc = word_scores(raw.tokens[j], m, cells.tokens[j], cells.mask[j])
            all_share.append(function_share(sc, content))
            all_top += bool(content[int(sc.argmax())])
            served = served_emb.mask[j][m]
            _, s_sc = word_scores(served_emb.tokens[j], m, cells.tokens[j], cells.mask[j])
            served_share.append(function_share(s_sc[served], content[served]) if served.any() else 0.0)
            served_top += bool(served.any()) and bool(content[int(s_sc.masked_fill(~served, float("-inf")).argmax())])
            best, _ = word_scores(raw.tokens[j], m, cells.tokens[len(chunk) + j], cells.mask[len(chunk) + j])
            best = best[content]
            hits += pointing_hits(best, layout.cells(p["slot"]))
            words += len(best)
    n = len(picks)
    return {"served_share": 100 * sum(served_share) / n, "all_share": 100 * sum(all_share) / n,
            "served_top": 100 * served_top / n, "all_top": 100 * all_top / n,
            "pointing": 100 * hits / max(words, 1), "words": words}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="+", default=["default"])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test", help="the Flickr8k split the captions and photos come from")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        print(f"bench_grounding: no collection at {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    col = load_pairs(args.data, split=args.split)
    picks = mosaic_picks(col, args.n, args.seed)
    layout = MosaicLayout()
    rows = []
    for ck in args.checkpoints:
        r = measure(None if ck == "default" else ck, col, picks, layout)
        rows.append((ck, r))
        print(ck, {k: round(v, 1) for k, v in r.items()}, flush=True)
    chance = 100 * layout.chance
    lines = ["| checkpoint | function-word share, served | strongest word is content, served | "
             "function-word share, all words | strongest is content, all words | mosaic pointing | x chance |",
             "|---|---|---|---|---|---|---|"]
    for ck, r in rows:
        lines.append(f"| {ck} | {r['served_share']:.1f} % | {r['served_top']:.1f} % | {r['all_share']:.1f} % | "
                     f"{r['all_top']:.1f} % | {r['pointing']:.1f} % ({r['words']} words) | {r['pointing'] / chance:.2f} |")
    table = "\n".join(lines)
    print(table)
    print(f"chance (a photo's share of the grid): {chance:.1f} %")
    if args.write:
        cmd = "bench/bench_grounding.py " + " ".join(sys.argv[1:])
        write_section(f"Grounding: word scores and mosaic pointing (Flickr8k {args.split})",
                      f"Machine: {machine()}; command: `.venv/bin/python {cmd}`.\n"
                      f"{args.n} random {args.split} captions (seed {args.seed}); word shares against the caption's "
                      f"own photo; pointing over content words in a 2x2 mosaic with 3 other {args.split} photos; chance "
                      f"{chance:.1f} %.\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
