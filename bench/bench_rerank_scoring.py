"""Re-rank scoring: one query's token GEMM against K candidates' stored rows, by chunk size.

    .venv/bin/python bench/bench_rerank_scoring.py [--index DIR] [--k 100] [--iters 400]

`TokenCodec.scores` widens int8/fp16 rows to float `SCORE_CHUNK` rows at a time and multiplies
each chunk while it is in cache. This bench runs it with several chunk sizes, one of them
larger than any candidate set (= decode everything, then one GEMM: the earlier code), on the
same random candidate sets, in random order per set, one thread, and reports medians and the
ratio to the one-pass form. The rows are gathered from a built index (`--index`, e.g. the 1M
bench's) or, without one, from a synthetic 20,000-image int8 store in memory.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import machine, write_section  # noqa: E402

ONE_PASS = 1 << 30


def rows_source(index: str | None, rng: np.random.Generator):
    """(codec, rows, offsets, lengths, label) of the image tokens to gather from."""
    from indexer.tokenstore import TokenCodec

    if index:
        from indexer.searcher import IndexStore

        store = IndexStore(index)
        data = store.segments[0].kinds["image"]
        return (store.codecs["image"], data["rows"], np.asarray(data["offsets"]), np.asarray(data["lengths"]),
                f"{index} ({len(data['lengths']):,} images, {store.manifest.token_form})")
    n, S, D = 20_000, 49, 256
    codec = TokenCodec("int8", D)
    x = rng.normal(size=(n * S, D)).astype(np.float32)
    rows = codec.encode(x / np.linalg.norm(x, axis=1, keepdims=True))
    return codec, rows, np.arange(n) * S, np.full(n, S), f"synthetic in-memory store ({n:,} images, int8)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", help="an index directory (default: a synthetic in-memory store)")
    ap.add_argument("--k", type=int, default=100, help="candidates per query")
    ap.add_argument("--words", type=int, default=12, help="query tokens")
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--chunks", type=int, nargs="+", default=[ONE_PASS, 2048, 1024, 512])
    ap.add_argument("--dry-run", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = ap.parse_args()

    from indexer import tokenstore
    from indexer.tokenstore import gather_rows

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    codec, rows, offsets, lengths, label = rows_source(args.index, rng)
    q = torch.nn.functional.normalize(torch.randn(args.words, codec.dim), dim=-1)
    times: dict[int, list[float]] = {c: [] for c in args.chunks}
    for it in range(args.iters):
        p = np.sort(rng.choice(len(lengths), size=args.k, replace=False))
        codes, _ = gather_rows(rows, offsets[p], lengths[p])
        ref = None
        for c in rng.permutation(args.chunks):
            tokenstore.SCORE_CHUNK = int(c)
            t0 = time.perf_counter()
            out = codec.scores(q, codes)
            times[int(c)].append(time.perf_counter() - t0)
            if ref is None:
                ref = out
            elif not torch.allclose(out, ref, atol=1e-5):
                raise SystemExit(f"chunk {c} changed the scores")
    base = float(np.median(times[ONE_PASS])) if ONE_PASS in times else None
    lines = []
    for c in args.chunks:
        med = float(np.median(times[c]))
        name = "one pass (decode all, then one GEMM)" if c == ONE_PASS else f"chunks of {c} rows"
        ratio = f"{med / base:.2f}" if base else "-"
        lines.append(f"| {name} | {med * 1e3:.3f} | {ratio} |")
        print(lines[-1], flush=True)
    cmd = "`.venv/bin/python bench/bench_rerank_scoring.py " + " ".join(sys.argv[1:]) + "`"
    body = f"""Command: {cmd}
Machine: {machine()}. Rows from {label}; {args.k} random candidates x {args.words} query tokens per
set, {args.iters} sets, every chunk size on each set in random order, one torch thread. Median ms
per `TokenCodec.scores` call (widen + GEMM + scale); ratio to the one-pass form.

| scoring | median ms | ratio |
|---|---|---|
{chr(10).join(lines)}
"""
    if args.dry_run:
        print(body)
    else:
        write_section("Indexer: re-rank scoring (chunked decode + GEMM)", body)


if __name__ == "__main__":
    main()
