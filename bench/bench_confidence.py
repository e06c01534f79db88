"""What a `min_confidence` cut does to a result page: on a test split, every query's top 10
(re-rank mode, both directions), how many non-matching results each threshold removes, how
many matches it loses and how many hits a query keeps.

The checkpoint must carry a calibration (`encoder calibrate-confidence`, fitted on val splits);
calibrate a copy, never the committed default model:

    cp -r encoder/default_model /tmp/calibrated
    PYTHONPATH=$PWD .venv/bin/python -m encoder.cli calibrate-confidence --checkpoint /tmp/calibrated \\
        --extra /work/ood-data
    PYTHONPATH=$PWD .venv/bin/python bench/bench_confidence.py --checkpoint /tmp/calibrated \\
        --extra /work/ood-data --write
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import FLICKR, machine, write_section  # noqa: E402
from encoder.confidence import TOP, calibration, confidence, platt_text, top_results  # noqa: E402
from encoder.data import load_pairs  # noqa: E402
from encoder.evaluate import encode_collection  # noqa: E402
from encoder.pipeline import Encoder  # noqa: E402

TITLE = "Confidence: what a min_confidence cut removes (top 10 per query, re-rank)"


def cut_table(conf: torch.Tensor, match: torch.Tensor, queries: int, thresholds: list[float]) -> list[dict]:
    """Per threshold, over all results (flat) of `queries` queries: share of non-matches
    removed, share of matches lost, hits left per query, share of matches among those left."""
    rows = []
    for t in thresholds:
        keep = conf >= t
        rows.append({"threshold": t,
                     "nonmatch_removed": float((~keep & ~match).sum() / max(1, int((~match).sum()))),
                     "match_lost": float((~keep & match).sum() / max(1, int(match.sum()))),
                     "hits_left": float(keep.sum()) / max(1, queries),
                     "precision_left": float((keep & match).sum() / max(1, int(keep.sum())))})
    return rows


def measure(encoder: Encoder, root: str, split: str, thresholds: list[float], workers: int) -> dict:
    col = load_pairs(root, split=split)
    t0 = time.time()
    images, captions = encode_collection(encoder, col, workers=workers, progress=False)
    score = encoder.score_config
    ab = calibration(score, "rerank")
    res = top_results(images, captions, torch.tensor(col.caption_image), score)["rerank"]
    out = {"images": len(col), "captions": len(col.captions), "seconds": round(time.time() - t0, 1), "directions": {}}
    groups = {"both": ("t2i", "i2t"), "text->image": ("t2i",), "image->text": ("i2t",)}
    for name, dirs in groups.items():
        c = torch.cat([confidence(res[d][0], ab).reshape(-1) for d in dirs])
        y = torch.cat([res[d][1].reshape(-1) for d in dirs])
        q = sum(res[d][0].shape[0] for d in dirs)
        out["directions"][name] = {"queries": q, "mean_confidence": float(c.mean()),
                                   "match_rate": float(y.float().mean()), "rows": cut_table(c, y, q, thresholds),
                                   "reliability": reliability(c, y)}
    return out


def reliability(conf: torch.Tensor, match: torch.Tensor, edges=(0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)) -> list[dict]:
    """Per confidence bin: how many results, their mean confidence and the share that match."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= hi))
        n = int(sel.sum())
        out.append({"bin": f"{lo:.1f}-{hi:.1f}", "results": n,
                    "mean_confidence": float(conf[sel].mean()) if n else None,
                    "match_rate": float(match[sel].float().mean()) if n else None})
    return out


def markdown(name: str, res: dict) -> str:
    lines = [f"**{name}** ({res['images']} images, {res['captions']} captions; encode + score {res['seconds']} s)", "",
             "| queries | threshold | non-matches removed | matches lost | hits left / query (of 10) | "
             "matches among those left |", "|---|---|---|---|---|---|"]
    for d, r in res["directions"].items():
        base = f"| {d} ({r['queries']}) | none | 0.0% | 0.0% | {TOP:.1f} | {100 * r['match_rate']:.1f}% |"
        lines.append(base)
        for row in r["rows"]:
            lines.append(f"| {d} | {row['threshold']:.1f} | {100 * row['nonmatch_removed']:.1f}% | "
                         f"{100 * row['match_lost']:.1f}% | {row['hits_left']:.2f} | "
                         f"{100 * row['precision_left']:.1f}% |")
    lines += ["", "Calibration check (mean confidence vs share of matches, per confidence bin):", "",
              "| queries | " + " | ".join(b["bin"] for b in res["directions"]["both"]["reliability"]) + " | all |",
              "|---|" + "---|" * (len(res["directions"]["both"]["reliability"]) + 1)]
    for d, r in res["directions"].items():
        cells = [("–" if b["results"] == 0 else
                  f"{100 * b['mean_confidence']:.0f}% vs {100 * b['match_rate']:.0f}% ({b['results']})")
                 for b in r["reliability"]]
        lines.append(f"| {d} | " + " | ".join(cells) +
                     f" | {100 * r['mean_confidence']:.1f}% vs {100 * r['match_rate']:.1f}% |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint calibrated by `encoder calibrate-confidence`")
    p.add_argument("--data", default=str(FLICKR))
    p.add_argument("--split", default="test")
    p.add_argument("--extra", nargs="*", default=[], help="more collections, measured on the same split")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5, 0.7])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--note", help="how the checkpoint was calibrated, for the section's command line")
    p.add_argument("--write", action="store_true", help="append the section to BENCHMARKS.md")
    args = p.parse_args()
    encoder = Encoder.from_pretrained(args.checkpoint)
    ab = calibration(encoder.score_config, "rerank")
    if ab is None:
        print(f"bench_confidence: error: {args.checkpoint} has no confidence calibration "
              "(run `encoder calibrate-confidence` on a copy first)", file=sys.stderr)
        return 2
    parts = [f"Machine: {machine()}", "",
             f"Command: `PYTHONPATH=$PWD .venv/bin/python bench/bench_confidence.py --checkpoint {args.checkpoint} "
             f"--split {args.split}" + (f" --extra {' '.join(args.extra)}" if args.extra else "")
             + f" --thresholds {' '.join(str(t) for t in args.thresholds)} --write`"
             + (f" ({args.note})" if args.note else "") + ".",
             "", f"Re-rank calibration: confidence = sigmoid({platt_text(*ab)}); "
             "global mode has its own pair. Every query's top 10 (K = 100 candidates); a match is a "
             "ground-truth pair (a caption query has 1 matching image, an image query 5 matching captions "
             "in Flickr8k)."]
    for root in [args.data, *args.extra]:
        res = measure(encoder, root, args.split, args.thresholds, args.workers)
        name = f"{Path(root).name} {args.split}"
        parts += ["", markdown(name, res)]
    body = "\n".join(parts)
    print(body)
    if args.write:
        write_section(TITLE, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
