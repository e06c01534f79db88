"""A 1M-image index from synthetic vectors drawn around real Flickr8k embeddings.

    .venv/bin/python bench/bench_indexer_1m.py [--n 1000000] [--tokens int8] [--real 256] [--checkpoint DIR]

Real global + token embeddings of `--real` Flickr8k images (encoded with the model) are the
seeds; each synthetic image is a random seed plus Gaussian noise (sigma chosen so a synthetic
vector keeps ~0.8 cosine to its seed), re-normalised -- clustered like real data, not uniform.
The items go through the build's own writers (raw append + SQLite rows + progress, then
`finalize`: HDF5 segment, FAISS with the `auto` rule, manifest with checksums), in batches, so
memory stays bounded. Reports wall time, peak RSS, sizes, the FAISS parameters `auto` picked
and their recall@100 against exact search, and query latency through `Searcher`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from indexer_common import FLICKR, checkpoint, machine, write_section  # noqa: E402


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--tokens", default="int8")
    ap.add_argument("--real", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--pool", type=int, default=8192, help="distinct synthetic token blocks")
    ap.add_argument("--noise", type=float, default=0.75, help="noise norm relative to the unit seed vector")
    ap.add_argument("--checkpoint")
    ap.add_argument("--workdir", help="where to build (default: a temp dir, removed afterwards)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--section", default="Indexer: 1M-image synthetic index", help="BENCHMARKS.md section title")
    args = ap.parse_args()

    from encoder.data import load_pairs
    from encoder.evaluate import encode_collection
    from encoder.model import checkpoint_digest
    from encoder.pipeline import Encoder
    from indexer import faiss_index, metadata
    from indexer.build import finalize
    from indexer.config import BuildConfig
    from indexer.manifest import META
    from indexer.searcher import Searcher
    from indexer.tokenstore import RawKind, TokenCodec

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-indexer-1m-"))
    ckpt, label = checkpoint(args.checkpoint, work)
    t0 = time.perf_counter()
    encoder = Encoder.from_pretrained(ckpt)
    col = load_pairs(FLICKR, limit=args.real)
    col.captions, col.caption_image = col.captions[: args.real], col.caption_image[: args.real]
    images, captions = encode_collection(encoder, col, workers=1, progress=False)
    seed_g = images.global_.numpy()
    seed_t = images.tokens.numpy()  # [R, T, D]
    R, T, D = seed_t.shape
    Dg = seed_g.shape[1]  # the global width: D, or D + the label route's part
    seed_s = time.perf_counter() - t0
    print(f"encoded {R} real seeds in {seed_s:.0f} s", flush=True)

    folder = work / "index1m.partial"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = BuildConfig(images=str(FLICKR), out=str(work / "index1m"), tokens=args.tokens, checkpoint=ckpt)
    codec = TokenCodec(args.tokens, D)
    rng = np.random.default_rng(0)
    if codec.needs_training:
        codec.train(seed_t.reshape(-1, D))
    raws = {k: RawKind.at(folder, k) for k in ("image", "caption")}
    con = metadata.connect(folder / META)
    sigma = args.noise / np.sqrt(D)
    # Token blocks: a pool of distinct noisy blocks, encoded once, reused by index -- the store's
    # bytes, I/O and memory behave like a real build while the CPU goes to writing, not to RNG.
    pool_codes = []
    for a in range(0, args.pool, 1024):
        m_ = min(1024, args.pool - a)
        blk = seed_t[rng.integers(0, R, m_)] + (rng.standard_normal((m_, T, D)) * sigma).astype(np.float32)
        blk /= np.linalg.norm(blk, axis=2, keepdims=True)
        pool_codes.append(codec.encode(blk.reshape(-1, D)).reshape(m_, T, codec.row_bytes))
    pool_codes = np.concatenate(pool_codes)
    t1 = time.perf_counter()
    for s in range(0, args.n, args.batch):
        b = min(args.batch, args.n - s)
        pick = rng.integers(0, R, b)
        g = seed_g[pick] + rng.standard_normal((b, Dg)).astype(np.float32) * (args.noise / np.sqrt(Dg))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        codes = pool_codes[rng.integers(0, args.pool, b)].reshape(-1, codec.row_bytes)
        ids = np.arange(s, s + b, dtype=np.int64)
        raws["image"].append(codes, g, ids, np.full(b, T, np.int64), codec.row_bytes)
        metadata.insert_items(con, [(int(i), "image", f"synthetic/{i:07d}.jpg", None, None,
                                     {"shard": int(i % 16)}, None, 0, int(i)) for i in ids])
        metadata.set_progress(con, {"position": s + b, "raw": {k: raws[k].sizes() for k in raws}})
        con.commit()
        if (s // args.batch) % 25 == 0:
            print(f"{s + b} items, {time.perf_counter() - t1:.0f} s, peak RSS {rss_gib():.2f} GiB", flush=True)
    metadata.add_fields(con, {"shard": 0})
    con.commit()
    con.close()
    raws["caption"].truncate({})
    write_s = time.perf_counter() - t1
    fake = SimpleNamespace(dim=Dg, token_dim=D, image_backbone=SimpleNamespace(grid=encoder.image_backbone.grid),
                           model=encoder.model)
    t2 = time.perf_counter()
    m = finalize(folder, cfg, fake, FLICKR, checkpoint_digest(ckpt), {"encode_seconds": write_s})
    final_s = time.perf_counter() - t2
    out = work / "index1m"
    shutil.rmtree(out, ignore_errors=True)
    os.replace(folder, out)
    for r in raws.values():
        RawKind.at(out, r.rows.name.split(".")[0]).remove()
    total_s = time.perf_counter() - t1
    peak = rss_gib()
    print(f"built in {total_s:.0f} s, peak RSS {peak:.2f} GiB", flush=True)

    # recall@100 against exact search. Queries: real Flickr8k *test* captions; the tune below
    # picks nprobe from *val* captions, so the recall reported for it is on held-out queries.
    s = Searcher(out, encoder=encoder)
    params = m.faiss["image"]
    test_caps = load_pairs(FLICKR, split="test").captions[::25][:200]
    val_caps = load_pairs(FLICKR, split="val").captions[::10][:500]
    q = encoder.encode_texts(test_caps).global_.numpy()
    seg = s.segments[0].kinds["image"]
    exact = faiss_index.exact_top([(seg["global"], seg["ids"])], q, 100)

    def recall_at(p) -> tuple[float, float]:
        t = time.perf_counter()
        _, got = faiss_index.search(s.faiss["image"], q, 100, p)
        ms = 1000 * (time.perf_counter() - t) / len(q)
        return float(np.mean([len(set(a) & set(b)) / 100 for a, b in zip(exact, got)])), ms

    recall, faiss_ms = recall_at(params)
    from indexer.maintain import tune

    t4 = time.perf_counter()
    tuned = tune(out, val_caps, target="images", recall=0.99)
    tune_s = time.perf_counter() - t4
    tuned_recall, tuned_ms = recall_at(tuned)
    s = Searcher(out, encoder=encoder)
    passes = []
    for _ in range(2):  # first pass: token pages read from disk (cold); second: the same queries, warm
        lat = [s.search_text(text, k=10, candidates=100).timings for text in test_caps[:30]]
        passes.append({k: 1000 * float(np.median([t[k] for t in lat])) for k in lat[0]})
    cold, med = passes
    sizes = {n: f["bytes"] for n, f in m.files.items()}
    cmd = "`.venv/bin/python bench/bench_indexer_1m.py " + " ".join(sys.argv[1:]) + "`"
    body = f"""Command: {cmd}
Machine: {machine()}. Seeds: {R} real Flickr8k images encoded with {label}; each synthetic image =
seed + Gaussian noise (norm {args.noise}) on the global vector (all {args.n:,} distinct) and on every token
(token blocks drawn from a pool of {args.pool:,} distinct noisy blocks), re-normalised.

| what | value |
|---|---|
| images | {args.n:,} ({T} tokens x {D}-d each), tokens {args.tokens} ({m.token_row_bytes * T} B/image) |
| stream + write (raw files, SQLite rows, progress) | {write_s:.0f} s |
| finalize (HDF5 segment copy, FAISS train+add, sha256 of every file) | {final_s:.0f} s |
| total build | **{total_s:.0f} s** ({args.n / total_s:,.0f} images/s) |
| peak RSS (whole process, incl. torch + model) | **{peak:.2f} GiB** of 24 GiB |
| index size | {sum(sizes.values()) / 2**30:.2f} GiB: {', '.join(f'{k} {v / 2**20:,.0f} MiB' for k, v in sizes.items())} |
| FAISS `auto` pick | `{params.factory}`, nprobe {params.nprobe}, trained on {params.train_size:,} |
| recall@100 vs exact (200 real Flickr8k test captions as queries) | **{recall:.3f}** ({faiss_ms:.2f} ms/query FAISS, 2 threads, batch of 200) |
| `indexer tune` on 500 val captions (target recall 0.99) | nprobe {tuned.nprobe} (recall {tuned.recall:.4f} on them), {tune_s:.0f} s |
| recall@100 at the tuned nprobe, same 200 test captions | **{tuned_recall:.3f}** ({tuned_ms:.2f} ms/query FAISS) |
| `Searcher.search_text` median ms (30 test captions, K=100 re-rank, tuned nprobe), first pass (pages cold) | {', '.join(f'{k} {v:.1f}' for k, v in cold.items())} |
| the same 30 queries again (warm) | {', '.join(f'{k} {v:.1f}' for k, v in med.items())} |
"""
    print(body)
    write_section(args.section, body)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    json.dump({"recall": recall, "tuned_nprobe": tuned.nprobe, "tuned_recall": tuned_recall, "total_s": total_s,
               "peak_gib": peak}, sys.stdout)


if __name__ == "__main__":
    main()
