"""Build overhead: `indexer build` vs backbone-only encoding of the same images, same run.

    .venv/bin/python bench/bench_indexer_build.py [--images 384] [--repeats 3] [--checkpoint DIR]

Baseline = the same DataLoader (read, hash, decode, preprocess in workers) + the image backbone
over the pixels + the text backbone over the captions, in the same batches. Build = the whole
`indexer.build.build` (heads, token codec, raw writes, SQLite, HDF5 segment, FAISS, manifest
with checksums). Runs alternate; medians are quoted; overhead = build / baseline - 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from indexer_common import FLICKR, checkpoint, machine, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tokens", default="fp16")
    ap.add_argument("--checkpoint")
    ap.add_argument("--dry-run", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = ap.parse_args()

    from encoder.pipeline import Encoder
    from indexer.build import _loader, build
    from indexer.config import BuildConfig
    from indexer.inputs import read_source

    work = Path(tempfile.mkdtemp(prefix="bench-indexer-build-"))
    ckpt, label = checkpoint(args.checkpoint, work)
    lines = (FLICKR / "pairs.jsonl").read_text().splitlines()[: args.images]
    pairs = work / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({**json.loads(x), "split": "bench"}) for x in lines) + "\n")
    encoder = Encoder.from_pretrained(ckpt)
    cfg = dict(images=str(FLICKR), captions=str(pairs), split="bench", checkpoint=ckpt, batch_size=args.batch_size,
               workers=args.workers, tokens=args.tokens, progress=False)
    source = read_source(FLICKR, pairs, "bench")
    n_caps = sum(len(e.captions) for e in source.entries)

    @torch.inference_mode()
    def baseline() -> float:
        t0 = time.perf_counter()
        caps = [c for e in source.entries for c in e.captions]
        done = 0
        for items in _loader(BuildConfig(out=str(work / "x"), **cfg), source, 0, encoder.preprocess):
            px = torch.stack([p for _, _, p, _ in items if p is not None]).to(encoder.device)
            encoder.image_backbone(px)
            n = len(items) * 5
            for s in range(done, done + n, 256):
                encoder.text_backbone(caps[s:min(s + 256, done + n)])
            done += n
        return time.perf_counter() - t0

    def full(i: int) -> float:
        t0 = time.perf_counter()
        build(BuildConfig(out=str(work / f"index{i}"), overwrite=True, **cfg), encoder=encoder)
        return time.perf_counter() - t0

    baseline()  # warm-up: page cache, lazy inits
    base, built = [], []
    for i in range(args.repeats):
        base.append(baseline())
        built.append(full(i))
        print(f"run {i}: baseline {base[-1]:.1f} s, build {built[-1]:.1f} s", flush=True)
    b, f = statistics.median(base), statistics.median(built)
    cmd = "`.venv/bin/python bench/bench_indexer_build.py " + " ".join(sys.argv[1:]) + "`"
    body = f"""Command: {cmd}
Machine: {machine()}. Model: {label}.

{args.images} Flickr8k images + {n_caps} captions, batch {args.batch_size}, {args.workers} decode worker(s),
tokens {args.tokens}, {args.repeats} alternating runs, medians:

| run | seconds (median) | images/s | runs |
|---|---|---|---|
| backbone-only (decode + image backbone + text backbone) | {b:.1f} | {args.images / b:.1f} | {', '.join(f'{x:.1f}' for x in base)} |
| `indexer build` (all of it: heads, codec, writes, SQLite, HDF5, FAISS, checksums) | {f:.1f} | {args.images / f:.1f} | {', '.join(f'{x:.1f}' for x in built)} |

**Build overhead over backbone-only encoding: {100 * (f / b - 1):+.1f} %** (goal <= 10 %).
"""
    print(body)
    if not args.dry_run:
        write_section("Indexer: build overhead", body)


if __name__ == "__main__":
    main()
