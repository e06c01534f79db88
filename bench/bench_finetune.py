"""Backbone fine-tuning experiment: a training config against the committed default model.

    .venv/bin/python bench/bench_finetune.py --config encoder/configs/finetune_text.json

Trains the config (`encoder train`; resumable, and a finished run is reused), then evaluates
its checkpoint and the committed default side by side on the Flickr8k 1K test (one process,
same machine state), and writes a `Encoder: <config> vs default (experiment)` section of
BENCHMARKS.md: val rsum per epoch of both runs (the default's from its committed
train_log.json), the test table of both, and the training time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLICKR, ROOT, machine, write_section  # noqa: E402

MODES = ("global", "two_stage", "exhaustive")


def _evaluate(checkpoint: str | None) -> dict:
    from encoder.cli import main as encoder_main

    out = Path(tempfile.mkdtemp()) / "eval.json"
    argv = ["evaluate", "--data", str(FLICKR), "--split", "test", "--json", str(out)]
    if checkpoint:
        argv += ["--checkpoint", checkpoint]
    if encoder_main(argv):
        raise SystemExit(f"bench_finetune: evaluating {checkpoint or 'the default model'} failed")
    return json.loads(out.read_text())


def _history_table(default: list[dict], run: list[dict]) -> list[str]:
    ours = {h["epoch"]: h for h in run}
    lines = ["| epoch | default: global | default: two-stage | this: global | this: two-stage | two-stage delta |",
             "|---|---|---|---|---|---|"]
    for h in default:
        o = ours.get(h["epoch"])
        if o is None:
            continue
        lines.append(f"| {h['epoch']} | {h['global']:.1f} | {h['two_stage']:.1f} | {o['global']:.1f} | "
                     f"{o['two_stage']:.1f} | {o['two_stage'] - h['two_stage']:+.1f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="TrainConfig JSON of the experiment")
    args = ap.parse_args()
    if not (FLICKR / "pairs.jsonl").is_file():
        print(f"bench_finetune: {FLICKR} is absent", file=sys.stderr)
        return 2
    from encoder.config import TrainConfig
    from encoder.evaluate import markdown_table
    from encoder.model import DEFAULT_CHECKPOINT
    from encoder.train import train

    cfg = TrainConfig.from_file(args.config)
    run = Path(cfg.out)
    ckpt = run / "checkpoint"
    if not (run / "train_log.json").is_file():
        ckpt = train(cfg)
    log = json.loads((run / "train_log.json").read_text())
    base_log = json.loads((DEFAULT_CHECKPOINT / "train_log.json").read_text())
    ours, base = _evaluate(str(ckpt)), _evaluate(None)
    name = Path(args.config).stem
    best_base = max(h["two_stage"] for h in base_log["history"])
    body = [
        f"Machine: {machine()}. Command: `.venv/bin/python bench/bench_finetune.py --config {args.config}` "
        f"(trains `{cfg.out}` if it has no train_log.json, then evaluates it and the committed default on test "
        "in one process).",
        f"Training: {log['train_seconds'] / 60:.1f} min (feature cache excluded); best epoch {log['best_epoch']}, "
        f"best val two-stage rsum {log['best_rsum']:.1f} vs the default's {best_base:.1f}.",
        "",
        "Final checkpoints on val (best epoch, fused score calibrated, K = rerank_k; with pooled global "
        "towers, after they were added): " + "; ".join(
            f"{who} global {lg['val']['global']['rsum']:.1f}, two-stage {lg['val']['two_stage']['rsum']:.1f}"
            + (f" (pooled towers: best epoch {lg['pooled_global']['best_epoch']}, {lg['pooled_global']['seconds']:.0f} s)"
               if "pooled_global" in lg else "")
            for who, lg in (("this", log), ("default", base_log))) + ".",
        "",
        "Val rsum per epoch (1,000 val images x 5,000 captions; two-stage at the per-epoch selection depth):",
        "",
        *_history_table(base_log["history"], log["history"]),
        "",
        f"Flickr8k 1K test, this run (`{ckpt}`):",
        "",
        markdown_table({k: ours[k] for k in MODES}),
        "",
        "Flickr8k 1K test, committed default (same process):",
        "",
        markdown_table({k: base[k] for k in MODES}),
        "",
        "Deltas (this - default): " + ", ".join(f"{k} {ours[k]['rsum'] - base[k]['rsum']:+.1f}" for k in MODES)
        + f"; encoding (images + captions) {ours['encode_seconds']:.0f} s vs {base['encode_seconds']:.0f} s.",
    ]
    write_section(f"Encoder: {name} vs default (experiment)", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
