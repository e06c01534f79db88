"""Issue 14's last two levers on VAL: multi-scale pooled regions (inference only) and re-rank
heads trained on stage one's candidates (`encoder train-rerank`), side by side with the default.

    .venv/bin/python bench/bench_rerank_levers.py [--regions cells 2 2,3 2,3,whole] [--masks none function]
        [--rerank runs/rerank/checkpoint ...] [--ood /work/ood-data] [--split val] [--n 300]

Everything starts from the committed default's outputs on the split, encoded once
(`encoder.frozen_cache`, under --cache-dir). Per row:
- regions (`encoder.regions`): the image tokens are the 49 cells plus the pooled k x k windows
  (`2,3,whole`: 2x2 and 3x3 windows and the whole image); a re-rank checkpoint's row applies its
  head (`encoder.rerank_head`) to the default's words (the bench checks that every other weight
  of the checkpoint is the default's, so this is what the checkpoint computes) with its own mask;
- the fused score re-fitted on the Flickr8k split (`refit_fusion`, as bench_word_weights.py),
  then Flickr8k global / two-stage rsum (K=100), the out-of-domain split's with the same score;
- function share / strongest is content: every caption against its own photo, word scores as
  MrSw weighs them (`bench_word_weights.word_shares`);
- mosaic pointing over content words, the same picks as `bench_grounding.py --split` (seed 0): a
  word points at its best token; a pooled region counts as a hit only when all its cells lie in
  the caption's photo (the whole-image region never does), so chance stays at most 9/49.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_grounding import mosaic_picks  # noqa: E402
from bench_word_weights import word_shares  # noqa: E402
from encoder.data import load_pairs  # noqa: E402
from encoder.evaluate import evaluate_embeddings  # noqa: E402
from encoder.fit_word_weights import refit_fusion  # noqa: E402
from encoder.frozen_cache import FrozenSplit, encode_split  # noqa: E402
from encoder.grounding import MosaicLayout  # noqa: E402
from encoder.heads import Embeddings  # noqa: E402
from encoder.model import TGDTModel  # noqa: E402
from encoder.pipeline import Encoder  # noqa: E402
from encoder.regions import multiscale_regions, region_cells  # noqa: E402
from encoder.transforms import load_image  # noqa: E402
from encoder.train_rerank import head_words, masked_captions  # noqa: E402


def parse_regions(spec: str) -> tuple[tuple[int, ...], bool] | None:
    """'cells' -> None; '2,3,whole' -> ((2, 3), True)."""
    if spec == "cells":
        return None
    parts = spec.split(",")
    return tuple(int(p) for p in parts if p != "whole"), "whole" in parts


def with_regions(images: Embeddings, spec, grid) -> Embeddings:
    if spec is None:
        return Embeddings(images.global_, images.tokens.float(), images.mask, images.domain)
    return multiscale_regions(Embeddings(images.global_, images.tokens.float(), images.mask, images.domain),
                              grid, spec[0], spec[1])


def rerank_head_of(path: str):
    """The checkpoint's re-rank head and word mask, after checking that every other weight is the default's."""
    model, base = TGDTModel.from_pretrained(path), TGDTModel.from_pretrained(None)
    if model.rerank_head is None:
        raise SystemExit(f"bench_rerank_levers: {path} has no re-rank head")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("rerank_head.")}
    ref = base.state_dict()
    if own.keys() != ref.keys() or any(not torch.equal(v, ref[k]) for k, v in own.items()):
        raise SystemExit(f"bench_rerank_levers: {path} is not the default model plus a re-rank head")
    return model.rerank_head.eval(), model.config.score.word_mask


@torch.inference_mode()
def mosaic_inputs(enc: Encoder, data: str, split: str, n: int, seed: int, layout: MosaicLayout):
    """The default's mosaic cells, the picked captions' raw words and content flags, the picks."""
    col = load_pairs(data, split=split)
    picks = mosaic_picks(col, n, seed)
    cells, words, masks, contents = [], [], [], []
    for b in range(0, len(picks), 32):
        chunk = picks[b:b + 32]
        mosaics = []
        for p in chunk:
            photos = [load_image(col.image_paths[i]) for i in p["others"]]
            photos.insert(p["slot"], load_image(col.image_paths[p["image"]]))
            mosaics.append(layout.compose(photos))
        cells.append(enc.encode_images(mosaics))
        tb = enc.text_backbone([p["caption"] for p in chunk])
        raw = enc.model.text_head(tb)
        for j in range(len(chunk)):
            words.append(raw.tokens[j])
            masks.append(raw.mask[j])
            contents.append(tb.content[j])
    return picks, cells, words, masks, contents


@torch.inference_mode()
def pointing(mosaic, spec, head, layout: MosaicLayout) -> tuple[float, int]:
    picks, cells, words, masks, contents = mosaic
    names = region_cells(layout.grid, *(spec if spec is not None else ((), False)))
    hits = total = 0
    flat = Embeddings(torch.cat([c.global_ for c in cells]), torch.cat([c.tokens for c in cells]),
                      torch.cat([c.mask for c in cells]))
    regions = with_regions(flat, spec, layout.grid).tokens
    for j, p in enumerate(picks):
        m = masks[j]
        w = words[j][None]
        if head is not None:
            w = head.text_tokens(w, m[None])
        w = w[0][m & contents[j][:m.shape[0]]]
        best = (w @ regions[j].T).argmax(-1)
        target = layout.cells(p["slot"])
        hits += sum(names[int(b)] <= target for b in best)
        total += len(best)
    return 100 * hits / max(total, 1), total


@torch.no_grad()
def row(label: str, fl: FrozenSplit, ood: FrozenSplit | None, mask: str, spec, head, mosaic, layout, score, grid,
        k: int) -> dict:
    t0 = time.time()
    images = with_regions(fl.images, spec, grid)
    caps = masked_captions(fl, mask)
    if head is not None:
        caps = head_words(head, caps)
    else:
        caps = Embeddings(caps.global_, caps.tokens.float(), caps.mask, caps.domain)
    fitted = refit_fusion(score.model_copy(update={"word_mask": mask}), images, caps, fl.caption_image, k)
    r = evaluate_embeddings(images, caps, fl.caption_image, fitted, k=k, modes=("global", "two_stage"))
    share, top = word_shares(images, caps, fl.content, fl.caption_image)
    pt, nwords = pointing(mosaic, spec, head, layout)
    out = {"model": label, "mask": mask, "regions": "cells" if spec is None else
           ",".join([*map(str, spec[0]), *(["whole"] if spec[1] else [])]),
           "tokens": images.tokens.shape[1], "alpha": fitted.alpha, "global": r["global"]["rsum"],
           "two_stage": r["two_stage"]["rsum"], "share": share, "top": top, "pointing": pt, "words": nwords}
    if ood is not None:
        oc = masked_captions(ood, mask)
        oc = head_words(head, oc) if head is not None else Embeddings(oc.global_, oc.tokens.float(), oc.mask, oc.domain)
        ro = evaluate_embeddings(with_regions(ood.images, spec, grid), oc, ood.caption_image, fitted, k=k,
                                 modes=("global", "two_stage"))
        out.update(ood_global=ro["global"]["rsum"], ood_two_stage=ro["two_stage"]["rsum"])
    out["seconds"] = round(time.time() - t0, 1)
    print({a: (round(b, 2) if isinstance(b, float) else b) for a, b in out.items()}, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--ood", default=None, help="an out-of-domain pairs.jsonl folder (bench/ood_devset.py)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--regions", nargs="*", default=["cells", "2", "2,3", "2,3,whole"])
    ap.add_argument("--masks", nargs="+", default=["none", "function"], choices=["none", "function"])
    ap.add_argument("--rerank", nargs="*", default=[], help="checkpoints written by `encoder train-rerank`")
    ap.add_argument("--n", type=int, default=300, help="mosaic pointing picks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "rerank"))
    args = ap.parse_args()
    for d in [args.data] + ([args.ood] if args.ood else []):
        if not Path(d).is_dir():
            print(f"bench_rerank_levers: no collection at {d}", file=sys.stderr)
            return 2
    torch.set_num_threads(2)
    enc = Encoder.from_pretrained(None, device="cpu")
    score = enc.model.config.score
    grid = tuple(enc.model.image_grid)
    fl = encode_split(enc, None, args.data, args.split, args.cache_dir)
    ood = encode_split(enc, None, args.ood, args.split, args.cache_dir) if args.ood else None
    layout = MosaicLayout(grid=grid)
    mosaic = mosaic_inputs(enc, args.data, args.split, args.n, args.seed, layout)
    rows = []
    for mask in args.masks:
        for spec in args.regions:
            rows.append(row("default", fl, ood, mask, parse_regions(spec), None, mosaic, layout, score, grid, args.k))
    for ck in args.rerank:
        head, mask = rerank_head_of(ck)
        rows.append(row(ck, fl, ood, mask, None, head, mosaic, layout, score, grid, args.k))
    chance = 100 * layout.chance
    lines = ["| model | word mask | regions (tokens) | alpha | global | two-stage | two-stage - global | function share | "
             "strongest is content | mosaic pointing (x chance) | OOD global | OOD two-stage |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mask']} | {r['regions']} ({r['tokens']}) | {r['alpha']:.2f} | "
                     f"{r['global']:.1f} | {r['two_stage']:.1f} | {r['two_stage'] - r['global']:+.1f} | "
                     f"{r['share']:.1f} % | {r['top']:.1f} % | {r['pointing']:.1f} % ({r['pointing'] / chance:.2f}) | "
                     f"{r.get('ood_global', float('nan')):.1f} | {r.get('ood_two_stage', float('nan')):.1f} |")
    print("\n".join(lines))
    print(f"pointing chance (a photo's share of the grid): {chance:.1f} %; words counted: {rows[0]['words']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
