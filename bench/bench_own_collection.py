"""Training on your own captions, measured: the default model, the default fine-tuned on the
collection (`--init-from default`), and a model trained on it from scratch, on its held-out
test part.

    nice -n 10 .venv/bin/python bench/bench_own_collection.py --data /work/ood-data

`--data` is a pairs.jsonl collection with splits train / val / test (e.g. the out-of-domain
set `bench/ood_devset.py` builds). The test lines are held out: the two training runs read a
copy of pairs.jsonl without them (`<work>/trainval.jsonl`), so nothing is trained, selected or
calibrated on test. Both runs are the user's own commands (`encoder train --data ...`, no
--epochs: the batch size and epochs adapt to the collection), started fresh each time; the
first one builds the backbone feature cache, which the second reuses (the table says how much
of each wall time that was). Writes the section `Own collection: <name>` at the end of
BENCHMARKS.md (or replaces it on a re-run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_section  # noqa: E402

MODES = ("global", "two_stage")


def _cli(argv: list[str]) -> float:
    """Run `encoder ARGV` in this process; its wall time in seconds."""
    from encoder.cli import main as encoder_main

    t0 = time.time()
    if encoder_main(argv):
        raise SystemExit(f"bench_own_collection: `encoder {' '.join(argv)}` failed")
    return time.time() - t0


def _evaluate(data: Path, checkpoint: str, out: Path) -> dict:
    seconds = _cli(["evaluate", "--data", str(data), "--split", "test", "--checkpoint", checkpoint,
                    "--modes", *MODES, "--json", str(out)])
    return {**json.loads(out.read_text()), "wall": seconds}


def _held_out_copy(data: Path, work: Path) -> tuple[Path, dict]:
    """pairs.jsonl without its test lines; the photo count of each split."""
    from encoder.data import pair_records

    counts: dict[str, int] = {}
    keep = []
    src = data / "pairs.jsonl"
    for line, (_, _, meta) in zip((l for l in src.read_text(encoding="utf-8").splitlines() if l.strip()),
                                  pair_records(src)):
        split = meta.get("split", "")
        counts[split] = counts.get(split, 0) + 1
        if split in ("train", "val"):
            keep.append(line)
    if not counts.get("test") or not counts.get("train"):
        raise SystemExit(f"bench_own_collection: {src} needs train and test splits (has {counts})")
    path = work / "trainval.jsonl"
    path.write_text("\n".join(keep) + "\n", encoding="utf-8")
    return path, counts


def _row(name: str, how: str, res: dict, log: dict | None, wall: float | None) -> str:
    g, t = res["global"], res["two_stage"]
    val = f"{log['val']['two_stage']['rsum']:.1f}" if log else "-"
    if log:
        pooled = log.get("pooled_global", {})
        when = (f"{wall / 60:.1f} min (cache {log['cache_seconds']:.0f} s; TGDT best epoch {log['best_epoch']} of "
                f"{log['epochs']}, batch {log['batch_size']}; towers best epoch {pooled.get('best_epoch', '-')})")
    else:
        when = "-"
    return (f"| {name} | {how} | {val} | {g['rsum']:.1f} | {t['i2t_r1']:.1f} | {t['t2i_r1']:.1f} | **{t['rsum']:.1f}** "
            f"| {when} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="collection folder with pairs.jsonl (splits train/val/test)")
    ap.add_argument("--work", default="runs/own_collection", help="run folders (emptied first)")
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    if not (data / "pairs.jsonl").is_file():
        print(f"bench_own_collection: no pairs.jsonl in {data}", file=sys.stderr)
        return 2
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    pairs, counts = _held_out_copy(data, work)
    started, load_start = time.time(), os.getloadavg()[0]
    default = _evaluate(data, "default", work / "eval_default.json")
    runs = {}
    for name, extra in (("finetune", ["--init-from", "default"]), ("scratch", [])):
        wall = _cli(["train", "--data", str(data), "--pairs", str(pairs.resolve()), "--out", str(work / name), *extra])
        log = json.loads((work / name / "train_log.json").read_text())
        runs[name] = (_evaluate(data, str(work / name / "checkpoint"), work / f"eval_{name}.json"), log, wall)
    total = time.time() - started
    cmd = f"nice -n 10 .venv/bin/python bench/bench_own_collection.py --data {args.data}"
    n = default["images"], default["captions"]
    body = [
        f"Machine: {machine()}. Command: `{cmd}` ({total / 60:.1f} min in all; 1-min load average "
        f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: other jobs shared the cores).",
        "",
        f"Collection `{data}`: {counts.get('train', 0)} train, {counts.get('val', 0)} val, {counts.get('test', 0)} "
        f"test photos. Held out: the test part ({n[0]} photos x {n[1]} captions), which no run trains, selects or "
        "calibrates on. Both training runs are `encoder train --data DIR --pairs trainval.jsonl [--init-from "
        "default]` on train (val for the epoch selection and the fused-score calibration), with the default "
        "config and no --epochs (the epochs and batch size adapt to the collection).",
        "",
        "| model | trained | val two-stage rsum | test global rsum | test two-stage i2t R@1 | test two-stage t2i R@1 "
        "| test two-stage rsum (K=100) | training wall time |",
        "|---|---|---|---|---|---|---|---|",
        _row("default", "Flickr8k only (committed `encoder/default_model`)", default, None, None),
        _row("fine-tuned", "`--init-from default`, then this collection's train", *runs["finetune"]),
        _row("from scratch", "this collection's train only", *runs["scratch"]),
        "",
        "Deltas on test two-stage rsum: fine-tuned - default "
        f"{runs['finetune'][0]['two_stage']['rsum'] - default['two_stage']['rsum']:+.1f}, from scratch - default "
        f"{runs['scratch'][0]['two_stage']['rsum'] - default['two_stage']['rsum']:+.1f}. Evaluation of the default "
        f"on test (encoding included): {default['wall']:.0f} s.",
    ]
    write_section(f"Own collection: {data.name}", "\n".join(body))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
