"""Issue 15: how far the label route alone reaches, over a wider grid than `encoder fit-route`'s.

    .venv/bin/python bench/bench_route_variants.py --checkpoint runs/default_v6 --ood /work/ood-data [--write]

`encoder fit-route` picks the route (prompt, lemmas per class, top-T, temperature) from 36
variants by the label route alone on the val splits; its best sat at the grid's edge (top-T
20, temperature 2). This sweeps past that edge -- top-T up to all 1,000 classes, temperatures
to 5 -- and adds WordNet definitions to the class prompts, scoring each variant the same way
(global-only rsum of label vectors, Flickr8k val and the out-of-domain dev set's val), next
to the trained global rsum of the route-less checkpoint: the ceiling of the route as built.
VAL only; `--checkpoint` is a route-less checkpoint (the label route reads its backbone's
pretrained classifier, which every checkpoint shares).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from indexer_common import FLICKR, machine, write_section  # noqa: E402

SECTION = "Label route: variants beyond fit-route's grid (val)"


def prompts_for(style: str, lemmas: list[str], definition: str, n: int) -> list[str]:
    if style == "definition":
        return [f"a {lemmas[0]}: {definition}"]
    return [style.format(x) for x in lemmas[:n]]


def main(argv: list[str] | None = None) -> int:
    from encoder.config import LabelRouteConfig, ScoreConfig
    from encoder.fit_route import encode_set, encode_texts_raw, label_only, route_encoder, rsum
    from encoder.label_route import LabelRoute, imagenet_classes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a route-less checkpoint (e.g. runs/default_v6)")
    ap.add_argument("--ood", required=True)
    ap.add_argument("--cache", default=".cache/fit_route")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args(argv)
    encoder = route_encoder(a.checkpoint)
    sets = [encode_set(encoder, "flickr8k", str(FLICKR), "val", 1, Path(a.cache)),
            encode_set(encoder, Path(a.ood).name, a.ood, "val", 1, Path(a.cache))]
    base = {s.name: rsum(s.images, s.captions, s.caption_image, encoder.model.config.score)["global"] for s in sets}
    classes = imagenet_classes()
    rows = []
    for style, n in (("a {}", 1), ("a {}", 3), ("{}", 1), ("definition", 1)):
        flat, counts = [], []
        for _, lemmas, definition in classes:
            ps = prompts_for(style, lemmas, definition, n)
            flat += ps
            counts.append(len(ps))
        _, sent = encode_texts_raw(encoder, flat)
        vecs = F.normalize(torch.stack([c.mean(0) for c in torch.split(sent, counts)]), dim=-1)
        for top_t, temp in itertools.product((20, 50, 100, 1000), (1.0, 2.0, 3.0, 5.0)):
            route = LabelRoute(LabelRouteConfig(top_t=top_t, temperature=temp))
            route.class_vectors.copy_(vecs)
            got = {s.name: label_only(route, s) for s in sets}
            rows.append((style if style == "definition" else f"{style!r} x{n}", top_t, temp, got))
            print(rows[-1], flush=True)
    ood = sets[1].name
    rows.sort(key=lambda r: -r[3][ood])
    table = "\n".join(f"| {p} | {t} | {T} | {g['flickr8k']:.1f} | {g[ood]:.1f} | {g[ood] / base[ood]:.2f} |"
                      for p, t, T, g in rows[:12])
    chosen = next(g for p, t, T, g in rows if p == "'a {}' x1" and t == 20 and T == 2.0)
    body = f"""Machine: {machine()}; command: `.venv/bin/python bench/bench_route_variants.py --checkpoint {a.checkpoint} --ood {a.ood} --write`.
Label route alone (global-only rsum of label vectors; ScoreConfig defaults), val splits, {len(rows)} variants: prompt
style x lemmas per class ("definition": "a {{lemma}}: {{WordNet definition}}"), top-T, temperature. The route-less
checkpoint's trained global rsum: Flickr8k val {base['flickr8k']:.1f}, {ood} val {base[ood]:.1f}. The committed
route ('a {{}}' x1, top-T 20, T 2): {chosen['flickr8k']:.1f} / {chosen[ood]:.1f}. The 12 best on {ood} val:

| prompt x lemmas | top-T | temperature | Flickr8k val | {ood} val | x trained global ({ood}) |
|---|---|---|---|---|---|
{table}
"""
    print(body)
    if a.write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
