"""The label route and the adaptive fusion, per set, side by side with the checkpoint it was
fitted on (issue 15).

    .venv/bin/python bench/bench_label_route.py --route DIR [--base default] \
        [--ood /work/ood-data] [--split test] [--write]

Per set (Flickr8k and each out-of-domain collection, `--split`): rsum of the base checkpoint
(global, two-stage) and of the route checkpoint (global = trained global + label route, two-stage
= that plus the adaptive token re-rank), the label route alone, and the route's adaptive
weights on that set (mean in-domain-ness of captions and images, mean label weight, mean re-rank
weight). Both checkpoints are encoded with the Encoder the service uses; `encoder evaluate`
gives the same rsums. `--write` appends the table to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import machine, write_section  # noqa: E402
from encoder.data import load_pairs  # noqa: E402
from encoder.evaluate import encode_collection, evaluate_embeddings  # noqa: E402
from encoder.fit_route import encode_set, label_only, route_encoder  # noqa: E402
from encoder.pipeline import Encoder  # noqa: E402


def run(ckpt: str | None, root: str, split: str) -> tuple[dict, Encoder, object, object]:
    enc = Encoder.from_pretrained(ckpt, device="cpu")
    col = load_pairs(root, split=split)
    ims, caps = encode_collection(enc, col, progress=False)
    res = evaluate_embeddings(ims, caps, torch.tensor(col.caption_image), enc.score_config,
                              modes=("global", "two_stage"))
    return {m: res[m]["rsum"] for m in ("global", "two_stage")}, enc, ims, caps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--route", required=True, help="checkpoint with the label route")
    ap.add_argument("--base", default="default", help="the route-less checkpoint it was fitted on")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    ap.add_argument("--ood", nargs="*", default=["/work/ood-data"])
    ap.add_argument("--split", default="test")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = None if args.base == "default" else args.base
    route_ckpt = None if args.route == "default" else args.route
    raw_encoder = route_encoder(base)
    sets = [("Flickr8k", args.data)] + [(Path(o).name, o) for o in args.ood]
    rows = []
    for name, root in sets:
        t0 = time.time()
        b, _, _, _ = run(base, root, args.split)
        r, enc, ims, caps = run(route_ckpt, root, args.split)
        route = enc.model.label_route
        raw = encode_set(raw_encoder, name, root, args.split, cache=None)
        alone = label_only(route, raw)
        sc = enc.score_config
        rows.append({"set": name, "base_global": b["global"], "base_two": b["two_stage"], "alone": alone,
                     "fused": r["global"], "two": r["two_stage"],
                     "cap_domain": float(caps.domain.mean()), "img_domain": float(ims.domain.mean()),
                     "cap_w": float(route.weight(caps.domain).mean()), "img_w": float(route.weight(ims.domain).mean()),
                     "alpha": float(sc.alpha_for(caps.domain).mean()) if sc.alpha_out is not None else sc.alpha,
                     "seconds": time.time() - t0})
        print(rows[-1], flush=True)
    cfg = enc.model.config
    lines = ["| set | base global | base two-stage | label route alone | global + route (fused) | two-stage (adaptive) "
             "| x base global | caption / image in-domain-ness | label weight (caption / image) | mean re-rank weight (t2i) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} {args.split} | {r['base_global']:.1f} | {r['base_two']:.1f} | {r['alone']:.1f} | "
                     f"{r['fused']:.1f} | **{r['two']:.1f}** | {r['two'] / max(r['base_global'], 1e-9):.2f} | "
                     f"{r['cap_domain']:.2f} / {r['img_domain']:.2f} | {r['cap_w']:.2f} / {r['img_w']:.2f} | "
                     f"{r['alpha']:.2f} |")
    lr = cfg.label_route
    chosen = (f"route: prompt {lr.prompt!r}, lemmas {lr.lemmas}, top-T {lr.top_t}, temperature {lr.temperature}; "
              f"label weight {lr.weight_in} (in domain) .. {lr.weight_out} (out); in-domain ramps: text "
              f"{lr.text_lo}..{lr.text_hi}, image {lr.image_lo}..{lr.image_hi}; re-rank weight alpha "
              f"{cfg.score.alpha} (in) .. {cfg.score.alpha_out} (out)")
    table = "\n".join(lines)
    print(table + "\n" + chosen)
    if args.write:
        cmd = "bench/bench_label_route.py " + " ".join(sys.argv[1:])
        write_section(f"Label route and adaptive fusion ({args.split} splits)",
                      f"Machine: {machine()}; command: `.venv/bin/python {cmd}`.\n"
                      f"Base = `{args.base}`, route = `{args.route}`. rsum (R@1+5+10 both ways); K = 100.\n\n"
                      f"{table}\n\nChosen on val (`fit_route.json` beside the checkpoint): {chosen}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
