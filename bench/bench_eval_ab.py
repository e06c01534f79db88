"""Two commits' in-memory evaluation side by side: rsum and seconds per mode on the same embeddings.

    .venv/bin/python bench/bench_eval_ab.py --base REV [--rounds 3]

Embeddings of the Flickr8k 1K test's shape (1,000 images x 49 cells, 5,000 captions of 8-16
real words of 32, 640-d globals; random, seeded, saved once as safetensors) are evaluated by
`encoder.evaluate.evaluate_embeddings` (global and two-stage, K=100) from a temporary git
worktree of REV and from this checkout, alternating, in fresh processes. Reports the median
seconds per mode, the ratio, and whether the rsums agree. Writes the "Encoder: evaluation
speed, side by side with REV" section of BENCHMARKS.md (unless --no-write).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from common import machine, side_by_side, write_section  # noqa: E402

RUN = """
import json, sys, time, torch
from safetensors.torch import load_file
from encoder.config import ScoreConfig
from encoder.evaluate import evaluate_embeddings
from encoder.heads import Embeddings
t = load_file(sys.argv[1])
im = Embeddings(t["ig"], t["it"], t["im"].bool())
cap = Embeddings(t["cg"], t["ct"], t["cm"].bool())
r = evaluate_embeddings(im, cap, t["owner"], ScoreConfig(alpha=0.3, local_reduce="sum"), k=100,
                        modes=("global", "two_stage"))
print(json.dumps({m: {"rsum": v["rsum"], "seconds": v["seconds"]} for m, v in r.items()}))
"""


def embeddings(path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    n, m = 1000, 5000
    owner = torch.arange(m) // 5
    ig = torch.nn.functional.normalize(torch.randn(n, 640, generator=g), dim=-1)
    # captions near their image, so the ranking is not noise
    cg = torch.nn.functional.normalize(ig[owner] + 1.2 * torch.randn(m, 640, generator=g) / 640 ** 0.5 * 8, dim=-1)
    it = torch.nn.functional.normalize(torch.randn(n, 49, 256, generator=g), dim=-1)
    ct = torch.nn.functional.normalize(torch.randn(m, 32, 256, generator=g), dim=-1)
    lengths = torch.randint(8, 17, (m,), generator=g)
    cm = torch.arange(32)[None, :] < lengths[:, None]
    save_file({"ig": ig, "cg": cg, "it": it.contiguous(), "ct": (ct * cm[..., None]).contiguous(),
               "im": torch.ones(n, 49, dtype=torch.uint8), "cm": cm.to(torch.uint8), "owner": owner}, str(path))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="eval-ab-"))
    data = tmp / "emb.safetensors"
    embeddings(data)

    def run(checkout: Path) -> dict:
        out = subprocess.run([sys.executable, "-c", RUN, str(data)], cwd=checkout, check=True, text=True,
                             capture_output=True, env={**os.environ, "PYTHONPATH": str(checkout)})
        return json.loads(out.stdout.strip().splitlines()[-1])

    runs = side_by_side(args.base, args.rounds, run)
    rows = []
    for mode in ("global", "two_stage"):
        sec = {n: statistics.median(x[mode]["seconds"] for x in v) for n, v in runs.items()}
        rs = {n: v[0][mode]["rsum"] for n, v in runs.items()}
        rows.append(f"| {mode} | {rs['base']:.2f} | {rs['this']:.2f} | {sec['base']:.2f} | {sec['this']:.2f} | "
                    f"{sec['this'] / sec['base']:.2f} |")
    body = "\n".join([
        f"Machine: {machine()}; command: `.venv/bin/python bench/bench_eval_ab.py --base {args.base} --rounds "
        f"{args.rounds}`.",
        "Random embeddings of the Flickr8k 1K test's shape (1,000 images x 49 cells; 5,000 captions, 8-16 words of 32; "
        "640-d globals), `evaluate_embeddings` from each checkout in a fresh process, alternating; median seconds.",
        "",
        f"| mode | rsum {args.base} | rsum this | seconds {args.base} | seconds this | ratio this / base |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    print(body)
    if not args.no_write:
        write_section(f"Encoder: evaluation speed, side by side with {args.base}", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
