"""Evaluation vs the HTTP API on the same index: does `encoder evaluate --index` report what users get?

    .venv/bin/python bench/bench_one_engine.py [--queries 5000] [--images 1000]

The Flickr8k test index of `service demo` (built by the committed default model when missing).
1. `encoder evaluate --index` (in process: `indexer.evaluation.evaluate_index`, the service's
   text runtime), two-stage K=100: rsum and each query's top 10;
2. `service --index` in a subprocess, as users run it: every test caption as a `POST /search/text`
   (k=10) and every test image uploaded to `POST /search/image` (k=10, target captions), one at a
   time; R@1/5/10 from the hits (all the protocol needs), and the share of queries whose top 10
   equals the evaluation's, id for id.
Writes the "One engine: evaluation = HTTP" section of BENCHMARKS.md (unless --no-write).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench_service_common import Served  # noqa: E402
from common import machine, write_section  # noqa: E402
from encoder.cli import INDEX_TEXT_RUNTIME  # noqa: E402
from encoder.protocol import owners, ranks_in_lists, recall_table  # noqa: E402
from indexer.evaluation import evaluate_index, index_collection  # noqa: E402
from indexer.searcher import Searcher  # noqa: E402
from service.demo import ensure_demo_index  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", type=Path, help="a Flickr8k test index (default: the demo's, built if missing)")
    p.add_argument("--queries", type=int, default=5000, help="captions sent over HTTP (all 5,000 by default)")
    p.add_argument("--images", type=int, default=1000, help="images uploaded over HTTP (all 1,000 by default)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    index = args.index or ensure_demo_index(split="test")

    t0 = time.perf_counter()
    searcher = Searcher(index)
    searcher.encoder.set_text_runtime(INDEX_TEXT_RUNTIME)
    rankings: dict = {}
    res, col = evaluate_index(searcher, {"split": "test"}, k=100, modes=("two_stage",), rankings=rankings)
    eval_s = time.perf_counter() - t0
    ev = res["two_stage"]
    _, img_ids, cap_ids = index_collection(searcher, {"split": "test"})  # evaluate_index's order
    t2i_want = rankings["two_stage"]["t2i"].ids[:, :10]
    i2t_want = rankings["two_stage"]["i2t"].ids[:, :10]
    owner = np.array(col.caption_image)
    img_pos = {int(i): p for p, i in enumerate(img_ids)}
    cap_pos_of = {int(c): p for p, c in enumerate(cap_ids)}
    print(f"evaluate --index: rsum {ev['rsum']} in {eval_s:.0f} s", file=sys.stderr)

    nq, ni = min(args.queries, len(col.captions)), min(args.images, len(col.images))
    t2i_got, i2t_got, lat = [], [], []
    with Served(index) as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for q in range(nq):
                t = time.perf_counter()
                r = c.post("/search/text", json={"query": col.captions[q], "k": 10})
                lat.append(time.perf_counter() - t)
                r.raise_for_status()
                t2i_got.append([h["id"] for h in r.json()["hits"]])
            for i in range(ni):
                data = Path(col.root, col.images[i]).read_bytes()
                r = c.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")},
                           data={"k": "10", "target": "captions"})
                r.raise_for_status()
                i2t_got.append([h["id"] for h in r.json()["hits"]])
    def positions(rows: list[list[int]], pos: dict[int, int]) -> np.ndarray:  # index ids -> positions
        return np.array([[pos.get(i, -1) for i in row] + [-1] * (10 - len(row)) for row in rows])

    t2i_pos, cap_pos = positions(t2i_got, img_pos), positions(i2t_got, cap_pos_of)
    http = recall_table(ranks_in_lists(owners(cap_pos, owner), np.arange(ni)),
                        ranks_in_lists(t2i_pos, owner[:nq]))
    same_t2i = float(np.mean([t2i_got[q] == t2i_want[q].tolist() for q in range(nq)]))
    same_i2t = float(np.mean([i2t_got[i] == i2t_want[i].tolist() for i in range(ni)]))
    full = nq == len(col.captions) and ni == len(col.images)
    lines = [
        f"Machine: {machine()}; command: `.venv/bin/python bench/bench_one_engine.py"
        f"{'' if full else f' --queries {nq} --images {ni}'}`.",
        f"Index: Flickr8k test split (1,000 images, 5,000 captions), the committed default model; evaluation with "
        f"text runtime `{INDEX_TEXT_RUNTIME}` (the service's default); the service: `service --index` on loopback, "
        f"default settings, one query at a time.",
        "",
        "| | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum |",
        "|---|---|---|---|---|---|---|---|",
        f"| `encoder evaluate --index` (two-stage, K=100; {eval_s:.0f} s) | " +
        " | ".join(f"{ev[k]:.2f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")) +
        f" | **{ev['rsum']:.2f}** |",
        f"| HTTP: {nq} `POST /search/text` + {ni} `POST /search/image` (k=10) | " +
        " | ".join(f"{http[k]:.2f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")) +
        f" | **{http['rsum']:.2f}** |",
        "",
        f"Top 10 identical, id for id: text->image {100 * same_t2i:.1f} % of {nq} queries, image->text "
        f"{100 * same_i2t:.1f} % of {ni}. Text query latency over HTTP (client side, sequential): median "
        f"{1000 * statistics.median(lat):.1f} ms.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("One engine: evaluation = HTTP (Flickr8k 1K test)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
