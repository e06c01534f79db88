"""The issue's baseline, measured: a plain global model on the frozen backbones' pooled features.

    .venv/bin/python bench/bench_baseline.py [--hidden 1024] [--epochs 20] [--seed 0]

The same code (`encoder/train_pooled.py`) trains the default model's pooled global towers,
there on the fine-tuned backbone's cells.

The recipe of `../shared/docs/seeds.md` ("A baseline measured on our backbones"): per modality,
the mean-pooled frozen features (EfficientNet-Lite0's 7x7 cells, MiniLM's word states, from the
same HDF5 caches `encoder train` builds with `encoder/configs/frozen_backbones.json`),
standardised with train statistics, dropout 0.3 -> 1024 -> GELU -> dropout -> 256,
L2-normalised; symmetric InfoNCE with a learned temperature
(init 0.07); AdamW, one-cycle lr 1e-3, weight decay 0.05, batch 256 with each image at most
once per batch; the epoch chosen on val by global rsum, then test. Writes the `Encoder: global
baseline on frozen pooled features` section of BENCHMARKS.md: the yardstick the TGDT default
(`Encoder: Flickr8k 1K test`) is held against.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLICKR, ROOT, machine, write_section  # noqa: E402

FROZEN = ROOT / "encoder" / "configs" / "frozen_backbones.json"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024, help="MLP hidden width")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (FLICKR / "pairs.jsonl").is_file():
        print(f"bench_baseline: {FLICKR} is absent", file=sys.stderr)
        return 2
    import torch

    from encoder.config import TrainConfig
    from encoder.train import captions_by_image, prepare_features, split_items
    from encoder.train_pooled import global_rsum, pooled_inputs, train_pooled_towers

    cfg = TrainConfig.from_file(FROZEN)
    feats = prepare_features(cfg)  # the frozen backbones' caches, as `encoder train` builds them
    image_x = pooled_inputs(None, feats, torch.arange(len(feats.image_ok)), image=True)
    text_x = pooled_inputs(None, feats, torch.arange(len(feats.caption_image)), image=False)
    tr_imgs, caps_of = captions_by_image(*split_items(feats, "train", None))
    va, te = split_items(feats, "val", None), split_items(feats, "test", None)
    t0 = time.time()
    image, text, log = train_pooled_towers(image_x, text_x, tr_imgs, caps_of, *va, hidden=args.hidden,
                                           dim=cfg.model.embed_dim, epochs=args.epochs, lr=cfg.pooled_lr,
                                           weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, seed=args.seed)
    train_s = time.time() - t0
    with torch.no_grad():
        t = global_rsum(image(image_x[te[0]]), text(text_x[te[1]]), te[2], table=True)
    cmd = "`.venv/bin/python bench/bench_baseline.py" + (f" --hidden {args.hidden}" if args.hidden != 1024 else "") + \
        (f" --epochs {args.epochs}" if args.epochs != 20 else "") + (f" --seed {args.seed}" if args.seed else "") + "`"
    body = [
        f"Machine: {machine()}. Command: {cmd}. The recipe of `../shared/docs/seeds.md` (see the script's "
        f"docstring; the code is `encoder/train_pooled.py`, which trains the default model's pooled global "
        f"towers): an MLP (hidden {args.hidden}) per modality on the mean-pooled frozen features, from the caches "
        f"of `encoder/configs/frozen_backbones.json`. Training {train_s:.0f} s ({args.epochs} epochs of every "
        f"train caption); best epoch {log['best_epoch']} by val global rsum {log['best_rsum']:.1f}. seeds.md "
        "reports rsum 298.8 for this recipe, the issue 275-290.",
        "",
        "| model | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum |",
        "|---|---|---|---|---|---|---|---|",
        f"| MLP on frozen pooled features, test | {t['i2t_r1']:.1f} | {t['i2t_r5']:.1f} | {t['i2t_r10']:.1f} | "
        f"{t['t2i_r1']:.1f} | {t['t2i_r5']:.1f} | {t['t2i_r10']:.1f} | **{t['rsum']:.1f}** |",
        "",
        "Val global rsum per epoch: " + " ".join(f"{h['epoch']}: {h['global']:.1f};" for h in log["history"]),
    ]
    write_section("Encoder: global MLP baseline on frozen pooled features", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
