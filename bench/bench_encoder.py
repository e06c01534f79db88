"""Encoder benchmark: the Flickr8k 1K test protocol in three modes with a checkpoint.

    .venv/bin/python bench/bench_encoder.py [--checkpoint DIR] [--k 100]

Writes the `Encoder: Flickr8k 1K test` section of BENCHMARKS.md (machine, date, command,
table, the goals as ratios from the same run) and, when the checkpoint has a training log
beside it, the training time and val history.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLICKR, ROOT, machine, write_section  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="checkpoint folder (default: the committed default model)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--train-log", help="train_log.json of the run that produced the checkpoint")
    args = ap.parse_args()
    if not (FLICKR / "pairs.jsonl").is_file():
        print(f"bench_encoder: {FLICKR} is absent", file=sys.stderr)
        return 2
    from encoder.cli import main as encoder_main

    out = Path(tempfile.mkdtemp()) / "eval.json"
    argv = ["evaluate", "--data", str(FLICKR), "--split", "test", "--k", str(args.k), "--json", str(out)]
    if args.checkpoint:
        argv += ["--checkpoint", args.checkpoint]
    rc = encoder_main(argv)
    if rc:
        return rc
    res = json.loads(out.read_text())
    from encoder.evaluate import markdown_table
    from encoder.model import DEFAULT_CHECKPOINT, TGDTModel

    ckpt = args.checkpoint or str(DEFAULT_CHECKPOINT.relative_to(ROOT))
    score = TGDTModel.from_pretrained(args.checkpoint).config.score
    g, t, e = res["global"], res["two_stage"], res["exhaustive"]
    cmd = "`.venv/bin/python bench/bench_encoder.py" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "") + "`"
    body = [
        f"Machine: {machine()}. Command: {cmd} (equivalently `.venv/bin/encoder evaluate --data "
        f"../shared/data/flickr8k --split test`). Checkpoint: `{ckpt}` (fused score alpha={score.alpha}, "
        f"calibrated on val). {res['images']} test images x {res['captions']} captions; encoding "
        f"{res['encode_seconds']:.0f} s; `seconds` is scoring time only.",
        "",
        markdown_table({k: res[k] for k in ("global", "two_stage", "exhaustive")}),
        "",
        "Goals, from this run:",
        f"- two-stage rsum {t['rsum']:.1f} (goal >= 360)",
        f"- two-stage - global = {t['rsum'] - g['rsum']:+.1f} rsum (goal >= +15)",
        f"- exhaustive - two-stage = {e['rsum'] - t['rsum']:+.1f} rsum (goal: two-stage within 1), "
        f"time ratio two-stage/exhaustive = {t['seconds'] / max(e['seconds'], 1e-9):.3f} (goal <= 0.05)",
    ]
    log_path = Path(args.train_log) if args.train_log else (Path(args.checkpoint).parent / "train_log.json"
                                                            if args.checkpoint else DEFAULT_CHECKPOINT / "train_log.json")
    if log_path.is_file():
        log = json.loads(log_path.read_text())
        cache = (f"{log['cache_seconds'] / 60:.1f} min in the run that trained it" if "cache_seconds" in log
                 else "not recorded in this log")
        body += ["", f"Training (`.venv/bin/encoder train`): {log.get('train_seconds', 0) / 60:.0f} min on this "
                 f"machine after the feature cache (built once per collection and backbone config: {cache}); "
                 f"best epoch {log.get('best_epoch')} by val two-stage rsum. "
                 "Val history (epoch: global / two-stage at the per-epoch selection depth):",
                 "", " ".join(f"{h['epoch']}: {h['global']:.0f}/{h['two_stage']:.0f};" for h in log["history"])]
    write_section("Encoder: Flickr8k 1K test", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
