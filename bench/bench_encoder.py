"""Encoder benchmark: the Flickr8k 1K test protocol in three modes with a checkpoint.

    .venv/bin/python bench/bench_encoder.py [--checkpoint DIR] [--k 100] [--repeats 3]

Encodes the test split once (as `encoder evaluate` does), then scores it `--repeats` times,
the modes interleaved, and reports each mode's median scoring time; then re-ranks at a sweep
of depths K against the same exhaustive run. Writes the `Encoder: Flickr8k 1K test` section
of BENCHMARKS.md (machine, date, command, table, the goals as ratios from the same run, the
K sweep) and, when the checkpoint has a training log beside it, the training time and val
history.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLICKR, ROOT, machine, write_section  # noqa: E402

SWEEP = (10, 20, 30, 50, 100)


def _median_runs(evaluate, runs: list[tuple[str, int]], repeats: int) -> dict[tuple[str, int], dict]:
    """Each (mode, K) scored `repeats` times, interleaved; metrics must agree, seconds are medians."""
    seen: dict[tuple[str, int], list[dict]] = {r: [] for r in runs}
    for _ in range(repeats):
        for mode, k in runs:
            seen[(mode, k)].append(evaluate((mode,), k)[mode])
    out = {}
    for key, rs in seen.items():
        if len({r["rsum"] for r in rs}) != 1:
            raise SystemExit(f"bench_encoder: {key} gave different rsums across repeats")
        out[key] = {**rs[0], "seconds": round(statistics.median(r["seconds"] for r in rs), 3)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="checkpoint folder (default: the committed default model)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="scoring runs per mode; times are medians")
    ap.add_argument("--train-log", help="train_log.json of the run that produced the checkpoint")
    args = ap.parse_args()
    if not (FLICKR / "pairs.jsonl").is_file():
        print(f"bench_encoder: {FLICKR} is absent", file=sys.stderr)
        return 2
    import torch

    from encoder.data import load_pairs
    from encoder.evaluate import encode_collection, evaluate_embeddings, markdown_table
    from encoder.model import DEFAULT_CHECKPOINT
    from encoder.pipeline import Encoder

    t0 = time.time()
    encoder = Encoder.from_pretrained(args.checkpoint)
    col = load_pairs(FLICKR, split="test")
    images, captions = encode_collection(encoder, col)
    encode_s = time.time() - t0
    caption_image, score = torch.tensor(col.caption_image), encoder.score_config

    def evaluate(modes, k):
        return evaluate_embeddings(images, captions, caption_image, score, k=k, modes=modes)

    ks = sorted(set(SWEEP) | {args.k})
    runs = [("global", args.k), ("exhaustive", args.k)] + [("two_stage", k) for k in ks]
    res = _median_runs(evaluate, runs, args.repeats)
    g, t, e = res[("global", args.k)], res[("two_stage", args.k)], res[("exhaustive", args.k)]

    ckpt = args.checkpoint or str(DEFAULT_CHECKPOINT.relative_to(ROOT))
    cmd = "`.venv/bin/python bench/bench_encoder.py" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "") + "`"
    sweep = ["| K | two-stage rsum | exhaustive - two-stage | seconds (median) | time / exhaustive |",
             "|---|---|---|---|---|"]
    for k in ks:
        r = res[("two_stage", k)]
        sweep.append(f"| {k} | {r['rsum']:.1f} | {e['rsum'] - r['rsum']:+.1f} | {r['seconds']:.2f} | "
                     f"{r['seconds'] / max(e['seconds'], 1e-9):.3f} |")
    body = [
        f"Machine: {machine()}. Command: {cmd} (the table is what `.venv/bin/encoder evaluate --data "
        f"../shared/data/flickr8k --split test` prints). Checkpoint: `{ckpt}` (fused score alpha={score.alpha}, "
        f"calibrated on val). {len(col.image_paths)} test images x {len(col.captions)} captions; encoding "
        f"{encode_s:.0f} s; `seconds` is scoring time only, the median of {args.repeats} interleaved runs.",
        "",
        markdown_table({"global": g, "two_stage": t, "exhaustive": e}),
        "",
        "Goals, from this run:",
        f"- two-stage rsum {t['rsum']:.1f} (goal >= 360)",
        f"- two-stage - global = {t['rsum'] - g['rsum']:+.1f} rsum (goal >= +15)",
        f"- exhaustive - two-stage = {e['rsum'] - t['rsum']:+.1f} rsum (goal: two-stage within 1), "
        f"time ratio two-stage/exhaustive = {t['seconds'] / max(e['seconds'], 1e-9):.3f} (goal <= 0.05)",
        "",
        "Re-rank depth K, against the same exhaustive run (stage two scores the union of both directions' "
        "candidate pairs: about 5,000 x K on this test set, of the 5M that exhaustive scores):",
        "",
        *sweep,
    ]
    log_path = Path(args.train_log) if args.train_log else (Path(args.checkpoint).parent / "train_log.json"
                                                            if args.checkpoint else DEFAULT_CHECKPOINT / "train_log.json")
    if log_path.is_file():
        log = json.loads(log_path.read_text())
        cache = ("not recorded in this log" if "cache_seconds" not in log else
                 "already built when the run started" if log["cache_seconds"] < 60 else
                 f"{log['cache_seconds'] / 60:.1f} min in the run that trained it")
        pooled = log.get("pooled_global")
        body += ["", f"Training (`.venv/bin/encoder train`): {log.get('train_seconds', 0) / 60:.0f} min on this "
                 f"machine after the feature cache (built once per collection and backbone config: {cache}); "
                 f"best epoch {log.get('best_epoch')} by val two-stage rsum. "
                 "Val history (epoch: global / two-stage at the per-epoch selection depth):",
                 "", " ".join(f"{h['epoch']}: {h['global']:.0f}/{h['two_stage']:.0f};" for h in log["history"])]
        if pooled:
            body += ["", f"Then the pooled global towers (included in the training time): {pooled['seconds']:.0f} s "
                     f"of training after {pooled['inputs_seconds']:.0f} s pooling the fine-tuned backbone outputs; "
                     f"best epoch {pooled['best_epoch']}, val global rsum {pooled['best_rsum']:.1f}. Final val: "
                     f"global {log['val']['global']['rsum']:.1f}, two-stage {log['val']['two_stage']['rsum']:.1f}."]
    write_section("Encoder: Flickr8k 1K test", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
