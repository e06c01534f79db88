"""`encoder train`, `evaluate`, `fit-route`, `calibrate-confidence`: thin argument parsing over their modules.

The command line is the top layer: `evaluate --index` reaches into `indexer` (the searcher the
service runs); nothing else in `encoder` imports `indexer`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from indexer.evaluation import evaluate_index
from indexer.searcher import Searcher

from .config import TrainConfig
from .confidence import calibrate, platt_text
from .data import CollectionError, load_pairs
from .evaluate import encode_collection, evaluate_embeddings, markdown_table
from .fit_route import fit
from .fit_word_weights import fit_idf
from .init_from import checkpoint_errors, checkpoint_path
from .model import CheckpointError
from .pipeline import Encoder
from .train import train
from .train_rerank import RerankTrainConfig, train_rerank
from .transforms import ImageError

# `encoder train` without --epochs: a fine-tune (--init-from) runs FINETUNE_EPOCHS epochs; a run from
# scratch the config's epochs, raised (at most 4x) to MIN_STEPS optimizer steps on a small collection
FINETUNE_EPOCHS = 6
MIN_STEPS = 100

# `evaluate --index` encodes its queries as the service does by default (service.settings.text_runtime)
INDEX_TEXT_RUNTIME = "onnx"

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.json"
RERANK_CONFIG = Path(__file__).resolve().parent / "configs" / "rerank.json"


def _train(args: argparse.Namespace) -> int:
    cfg = TrainConfig.from_file(args.config)
    updates = {k: v for k, v in (("out", args.out), ("epochs", args.epochs), ("data", args.data),
                                 ("pairs_file", args.pairs), ("init_from", args.init_from)) if v is not None}
    if args.data and not args.out:  # a run folder per collection: never resume another collection's run
        updates["out"] = str(Path("runs") / (Path(args.data).resolve().name or "collection"))
    if args.epochs is None:  # fine-tunes converge in a few epochs; a small collection's are a few steps each
        fine_tune = args.init_from or cfg.init_from
        updates.update({"epochs": FINETUNE_EPOCHS} if fine_tune else {"min_steps": MIN_STEPS})
    cfg = cfg.model_copy(update=updates)
    load_pairs(cfg.data, cfg.pairs_file)  # a wrong folder or a bad line fails here, before any run folder
    t0 = time.time()
    ckpt = train(cfg)
    print(f"checkpoint written to {ckpt} in {time.time() - t0:.0f} s")
    return 0


def _train_rerank(args: argparse.Namespace) -> int:
    cfg = RerankTrainConfig.from_file(args.config)
    updates = {k: v for k, v in (("out", args.out), ("epochs", args.epochs), ("checkpoint", args.checkpoint),
                                 ("word_mask", args.word_mask)) if v is not None}
    cfg = cfg.model_copy(update=updates)
    t0 = time.time()
    ckpt = train_rerank(cfg)
    print(f"checkpoint with the re-rank head written to {ckpt} in {time.time() - t0:.0f} s "
          f"(log: {Path(cfg.out) / 'train_log.json'})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    t0 = time.time()
    if args.index:
        searcher = Searcher(args.index, device=args.device)
        runtime = searcher.encoder.set_text_runtime(args.text_runtime or INDEX_TEXT_RUNTIME)
        filters = {"split": args.split} if args.split else None
        score = searcher.score if args.alpha is None else searcher.score.model_copy(update={"alpha": args.alpha})
        res, col = evaluate_index(searcher, filters, k=args.k, modes=args.modes, score=score, workers=args.workers)
        source = f"index {args.index} split={args.split or 'all'} text={runtime}"
    else:
        if not args.data:
            raise ValueError("--data DIR (a folder with images and pairs.jsonl) or --index DIR is required")
        col = load_pairs(args.data, args.pairs, split=args.split)
        ckpt = checkpoint_path(args.checkpoint or "default")
        with checkpoint_errors(ckpt):
            encoder = Encoder.from_pretrained(ckpt, device=args.device)
        runtime = encoder.set_text_runtime(args.text_runtime or "torch")
        images, captions = encode_collection(encoder, col, workers=args.workers)
        score = encoder.score_config
        if args.alpha is not None:
            score = score.model_copy(update={"alpha": args.alpha})
        res = evaluate_embeddings(images, captions, torch.tensor(col.caption_image), score, k=args.k, modes=args.modes)
        source = f"{args.data} split={args.split or 'all'} checkpoint={args.checkpoint or 'default'} text={runtime}"
    seconds = time.time() - t0
    n_img, n_cap = len(col.images), len(col.captions)
    print(f"{source}: {n_img} images x {n_cap} captions, {seconds:.1f} s")
    print(markdown_table(res))
    if args.json:
        doc = {**res, "images": n_img, "captions": n_cap, "seconds": round(seconds, 2), "source": source}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _fit_route(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = fit(args.checkpoint, args.data, args.ood or [], args.out, workers=args.workers, route_from=args.route_from)
    print(f"checkpoint with the label route written to {out} in {time.time() - t0:.0f} s "
          f"(choices and val tables: {out / 'fit_route.json'})")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    t0 = time.time()
    summary = calibrate(args.checkpoint, args.data, args.split, args.extra or [], device=args.device,
                        workers=args.workers)
    for mode, s in summary.items():
        print(f"{mode}: confidence = sigmoid({platt_text(s['a'], s['b'])}) from {s['results']} results "
              f"({s['matches']} matches)")
    print(f"written to {Path(args.checkpoint) / 'config.json'} in {time.time() - t0:.0f} s "
          "(the checkpoint digest changed: rebuild indexes built from it)")
    return 0


def _word_weights(args: argparse.Namespace) -> int:
    t0 = time.time()
    with checkpoint_errors(checkpoint_path(args.checkpoint or "default")):
        out = fit_idf(None if args.checkpoint in (None, "default") else args.checkpoint, args.data, args.out,
                      args.power, args.pairs)
    print(f"checkpoint with IDF word weights (power {args.power:g}) written to {out} in {time.time() - t0:.0f} s "
          "(its re-rank confidence was dropped: re-run calibrate-confidence)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="encoder", description="Train and evaluate the TGDT image-text encoder.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="cache backbone features, train the heads, write a checkpoint folder")
    t.add_argument("--config", default=str(DEFAULT_CONFIG), help="TrainConfig JSON (default: the default model's)")
    t.add_argument("--out", help="run folder (overrides the config)")
    t.add_argument("--epochs", type=int, help=f"epochs (default: {FINETUNE_EPOCHS} with --init-from; otherwise the "
                   f"config's, raised to {MIN_STEPS} steps on a small collection)")
    t.add_argument("--data", help="collection folder (overrides the config); the run folder is then runs/<its name>")
    t.add_argument("--pairs", help="JSONL file name inside --data, or a path (default: pairs.jsonl)")
    t.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune this checkpoint folder instead of training from scratch ('default': the "
                        "committed default model)")
    t.set_defaults(func=_train)
    rr = sub.add_parser("train-rerank", help="train a re-rank head on a frozen model's stage-one candidates "
                                             "(loss on the fused score; the global path is unchanged)")
    rr.add_argument("--config", default=str(RERANK_CONFIG), help="RerankTrainConfig JSON")
    rr.add_argument("--checkpoint", help="the frozen model (overrides the config; 'default': the committed one)")
    rr.add_argument("--out", help="run folder (overrides the config); the checkpoint goes to OUT/checkpoint")
    rr.add_argument("--epochs", type=int, help="epochs (overrides the config)")
    rr.add_argument("--word-mask", choices=["none", "function"], help="word mask of the new checkpoint")
    rr.set_defaults(func=_train_rerank)
    e = sub.add_parser("evaluate", help="R@K, rsum, median rank for global / two-stage / exhaustive search")
    e.add_argument("--checkpoint", help="checkpoint folder (default or 'default': the committed default model)")
    e.add_argument("--data", help="collection folder with images and a pairs JSONL")
    e.add_argument("--pairs", default="pairs.jsonl", help="JSONL file name inside --data (or a path)")
    e.add_argument("--split", help="only this split (e.g. test); omit for collections without splits")
    e.add_argument("--index", help="evaluate through a built index instead of re-encoding")
    e.add_argument("--k", type=int, default=100, help="re-rank depth K of two-stage search")
    e.add_argument("--modes", nargs="+", default=["global", "two_stage", "exhaustive"],
                   choices=["global", "two_stage", "exhaustive"])
    e.add_argument("--alpha", type=float, help="override the checkpoint's local/global mixing weight")
    e.add_argument("--text-runtime", choices=["torch", "onnx", "onnx-int8"],
                   help=f"what encodes the captions (the service's query encoders; onnx needs onnxruntime); "
                        f"default: {INDEX_TEXT_RUNTIME} with --index (the service's default), else torch")
    e.add_argument("--json", help="also write the results as JSON keyed by mode")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--workers", type=int, default=1, help="image decoding workers")
    e.set_defaults(func=_evaluate)
    r = sub.add_parser("fit-route", help="add the ImageNet-label route and the adaptive fusion to a checkpoint "
                                         "(fitted on val splits, no gradient training)")
    r.add_argument("--checkpoint", help="route-less checkpoint folder (default: the committed default model)")
    r.add_argument("--data", default="../shared/data/flickr8k", help="the training collection (train: banks; val: fit)")
    r.add_argument("--ood", nargs="*", help="out-of-domain dev collections (their val split joins the fit)")
    r.add_argument("--out", required=True, help="folder for the new checkpoint")
    r.add_argument("--workers", type=int, default=1, help="image decoding workers")
    r.add_argument("--route-from", help="reuse this checkpoint's route (class vectors, banks, weights) and refit "
                                        "only the fused score: for a retrained model of the same backbones")
    r.set_defaults(func=_fit_route)
    c = sub.add_parser("calibrate-confidence",
                       help="fit each hit's confidence (Platt scaling of the score, per mode) on val matches and "
                            "store it in the checkpoint's config.json, in place: this changes the checkpoint "
                            "digest, so indexes built from it must be rebuilt")
    c.add_argument("--checkpoint", required=True, help="checkpoint folder, rewritten in place (score section)")
    c.add_argument("--data", default="../shared/data/flickr8k", help="collection folder with images and pairs.jsonl")
    c.add_argument("--split", default="val", help="split the fit reads, in --data and every --extra collection")
    c.add_argument("--extra", nargs="*", help="more collections whose split joins the fit (e.g. out-of-domain ones)")
    c.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    c.add_argument("--workers", type=int, default=1, help="image decoding workers")
    c.set_defaults(func=_calibrate)
    w = sub.add_parser("word-weights", help="weight each word in MrSw and the grounding by the IDF of the training "
                                            "captions (a table stored in the new checkpoint); the fused score is "
                                            "re-fitted on val")
    w.add_argument("--checkpoint", help="checkpoint folder (default or 'default': the committed default model)")
    w.add_argument("--data", default="../shared/data/flickr8k", help="collection with split fields (train: the "
                                                                     "IDF; val: the fusion)")
    w.add_argument("--pairs", default="pairs.jsonl", help="JSONL file name inside --data (or a path)")
    w.add_argument("--power", type=float, default=1.0, help="IDF ** power (0: every word weighs 1)")
    w.add_argument("--out", required=True, help="folder for the new checkpoint")
    w.set_defaults(func=_word_weights)
    return p


def _one_line(e: Exception) -> str:
    """The reason on one line: multi-line messages (pydantic's) joined; for an error re-raised
    from a DataLoader worker, whose message carries the worker's traceback, its last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        return args.func(args)
    except (CollectionError, CheckpointError, ImageError, OSError, ValueError) as e:
        print(f"encoder {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"encoder {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
