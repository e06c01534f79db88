"""`indexer build|add|remove|compact|info|verify|search`: argument parsing over the indexer modules.

User mistakes (missing folders, existing output, bad options, unreadable checkpoints) end with
exit code 2 and one line on stderr; an interrupted build exits 130 and resumes on re-run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from encoder.transforms import ImageError, load_image

from .build import BuildError, build
from .config import BuildConfig
from .info import index_info
from .inputs import InputError
from .maintain import add, compact, remove, tune
from .manifest import IndexFormatError, read_manifest, verify_files
from .metadata import FilterError
from .ray_build import add_ray_arguments, ray_build, ray_config_from_args
from .searcher import Searcher

EXIT_USER = 2


def _build_config(args: argparse.Namespace):
    return BuildConfig(images=args.images, captions=args.captions, out=args.out, checkpoint=args.checkpoint,
                       faiss=args.faiss, tokens=args.tokens, overwrite=args.overwrite, split=args.split,
                       id_field=args.id_field, allow_missing=args.allow_missing, skip_bad_lines=args.skip_bad_lines,
                       batch_size=args.batch_size, workers=args.workers, device=args.device,
                       progress=not args.quiet, faiss_like=args.faiss_like)


def _summary(m) -> str:
    b = m.build
    bad = f", bad captions lines {b['bad_line']}" if b.get("bad_line") else ""
    return (f"{m.counts['images']} images, {m.counts['captions']} captions; skipped {b.get('skipped', 0)}, "
            f"duplicates {b.get('duplicate', 0)}, missing {b.get('missing', 0)}{bad} (see build_report.json); "
            f"faiss image={m.faiss['image'].factory} caption={m.faiss['caption'].factory}; tokens {m.token_form} "
            f"({m.token_row_bytes * m.image_tokens} B/image)")


def _cmd_build(args) -> int:
    if args.engine == "ray":  # ray_build imports Ray itself, and says so when it is missing
        m = ray_build(_build_config(args), ray_config_from_args(args))
    else:
        m = build(_build_config(args))
    print(f"{args.out}: {_summary(m)}")
    return 0


def _cmd_add(args) -> int:
    m = add(args.index, images=args.images, captions=args.captions, split=args.split, batch_size=args.batch_size,
            workers=args.workers, device=args.device, progress=not args.quiet, id_field=args.id_field,
            allow_missing=args.allow_missing, skip_bad_lines=args.skip_bad_lines)
    print(f"{args.index}: now {_summary(m)}")
    return 0


def _cmd_remove(args) -> int:
    n = remove(args.index, ids=args.ids or [], paths=args.paths or [])
    print(f"{args.index}: {n['images']} image(s) and {n['captions']} caption(s) marked deleted; "
          f"`indexer compact` reclaims their space")
    return 0


def _cmd_compact(args) -> int:
    m = compact(args.index)
    print(f"{args.index}: compacted; {_summary(m)}")
    return 0


def _cmd_info(args) -> int:
    info = index_info(args.index, verify=args.verify)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"index {info['path']} (format {info['format_version']}, created {info['created']})")
        print(f"  images {info['images']} (+{info['deleted_images']} deleted), captions {info['captions']} "
              f"(+{info['deleted_captions']} deleted)")
        print(f"  model {info['model']['checkpoint']} sha256 {info['model']['checkpoint_digest'][:16]}..., "
              f"dim {info['dim']}, grid {info['grid']}")
        print(f"  tokens {info['token_form']}: {info['token_bytes_per_image']} bytes/image")
        for k, f in info["faiss"].items():
            print(f"  faiss {k}: {f['factory']} nprobe={f['nprobe']} efSearch={f['ef_search']}")
        print(f"  {info['bytes'] / 1e6:.1f} MB in {len(info['files'])} files; health: "
              f"{'ok' if info['health']['ok'] else '; '.join(info['health']['problems'])} "
              f"({info['health']['checked']}{'' if args.verify else '; --verify or `indexer verify` hashes them'})")
    return 0 if info["health"]["ok"] else 1


def _cmd_verify(args) -> int:
    """Every file against the manifest's sha256: exit 0 when all match, 1 naming the ones that do not."""
    m = read_manifest(args.index)
    t0 = time.perf_counter()
    problems = verify_files(Path(args.index), m)
    seconds = time.perf_counter() - t0
    total = sum(int(f["bytes"]) for f in m.files.values())
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems, "files": len(m.files), "bytes": total,
                          "seconds": round(seconds, 3)}))
    else:
        for p in problems:
            print(f"indexer: {args.index}: {p}", file=sys.stderr)
        print(f"{args.index}: {'ok' if not problems else f'FAILED ({len(problems)} of {len(m.files)} files)'}: "
              f"{len(m.files)} files, {total / 1e6:.1f} MB hashed in {seconds:.2f}s "
              f"({total / 1e6 / max(seconds, 1e-9):.0f} MB/s)")
    return 0 if not problems else 1


def _cmd_search(args) -> int:
    filters = _filters(args.filters)
    s = Searcher(args.index, device=args.device)
    if args.image:
        try:
            image = load_image(args.image)
        except ImageError as e:
            raise ValueError(f"--image {args.image}: {e}") from None
        res = s.search_image(image, k=args.k, candidates=args.candidates, mode=args.mode,
                             filters=filters, target=args.target)
    else:
        res = s.search_text(args.text, k=args.k, candidates=args.candidates, mode=args.mode, filters=filters,
                            explain=args.explain)
    for h in res.hits:
        label = h.path if h.kind == "image" else h.caption
        print(f"{h.score:8.3f}  {h.id:>8}  {label}")
    print(json.dumps({k: round(v * 1000, 2) for k, v in res.timings.items()}) + " ms", file=sys.stderr)
    return 0


def _filters(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        filters = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--filters is not JSON ({e.msg} at column {e.colno}); e.g. '{{\"split\": \"test\"}}'") from None
    if not isinstance(filters, dict):
        raise ValueError("--filters must be a JSON object, e.g. '{\"split\": \"test\"}'")
    return filters


def read_queries(path: str | Path) -> list[str]:
    """One query per line, or every caption of a pairs-style .jsonl file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out: list[str] = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n}: not a JSON line") from None
                caps = row.get("captions", row.get("query", [])) if isinstance(row, dict) else []
                out += [caps] if isinstance(caps, str) else [c for c in caps if isinstance(c, str)]
        return out
    return [line.strip() for line in text.splitlines() if line.strip()]


def _cmd_tune(args) -> int:
    p = tune(args.index, read_queries(args.queries), target=args.target, recall=args.recall)
    print(f"{args.target}: {p.factory} nprobe={p.nprobe} (recall@100 {p.recall:.4f} on the given queries)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indexer", description="Build and maintain image-text retrieval indexes.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--batch-size", type=int, default=64)
        sp.add_argument("--workers", type=int, default=1, help="DataLoader decode workers")
        sp.add_argument("--device", help="torch device (default: cuda when available)")
        sp.add_argument("--split", help="with a pairs JSONL/CSV: only lines of this split")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    def inputs(sp):
        sp.add_argument("--id-field", help="the captions file's own image id field, returned with every hit as "
                        "user_id (default: 'id' where the file has it)")
        sp.add_argument("--allow-missing", action="store_true",
                        help="build even when most images the captions file names are missing")
        sp.add_argument("--skip-bad-lines", action="store_true",
                        help="skip unreadable captions lines (listed in build_report.json) instead of stopping")

    b = sub.add_parser("build", help="encode a collection into a new index directory")
    b.add_argument("--images", required=True, help="folder of images (searched recursively); stored paths are "
                   "relative to it")
    b.add_argument("--captions", help="pairs .jsonl, COCO captions .json or .csv; its image names are read relative "
                   "to its own folder, else to --images")
    b.add_argument("--out", required=True, help="index directory to create")
    b.add_argument("--checkpoint", help="encoder checkpoint folder (default: the packaged default model)")
    b.add_argument("--faiss", default="auto", choices=["auto", "flat", "ivf", "hnsw", "ivfpq"])
    b.add_argument("--tokens", default="fp16", help="token store form: fp16, fp32, int8, pqM, opqM (e.g. pq32)")
    b.add_argument("--faiss-like", metavar="INDEX",
                   help="reuse this index's trained FAISS galleries (same model) instead of training new ones: "
                        "build every shard of a collection with the same one, so that their merged answer is one "
                        "index's (service-ray)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: decode and encode on a Ray cluster, merge into the same format")
    add_ray_arguments(b)
    common(b)
    inputs(b)
    b.set_defaults(func=_cmd_build)

    a = sub.add_parser("add", help="add images (and captions) to an index without rebuilding it")
    a.add_argument("index")
    a.add_argument("--images", required=True)
    a.add_argument("--captions")
    common(a)
    inputs(a)
    a.set_defaults(func=_cmd_add)

    r = sub.add_parser("remove", help="tombstone items by id or image path (compact reclaims space)")
    r.add_argument("index")
    r.add_argument("--ids", type=int, nargs="+")
    r.add_argument("--paths", nargs="+", help="image paths as stored (relative to the images root)")
    r.set_defaults(func=_cmd_remove)

    c = sub.add_parser("compact", help="rewrite the index without deleted items, merge segments")
    c.add_argument("index")
    c.set_defaults(func=_cmd_compact)

    t = sub.add_parser("tune", help="re-pick an IVF gallery's nprobe for a recall target from real queries")
    t.add_argument("index")
    t.add_argument("--queries", required=True, help="text file, one query per line (or a pairs .jsonl: its captions)")
    t.add_argument("--target", default="images", choices=["images", "captions"], help="the gallery searched")
    t.add_argument("--recall", type=float, default=0.99, help="recall@100 against exact search to reach")
    t.set_defaults(func=_cmd_tune)

    i = sub.add_parser("info", help="counts, sizes, model, FAISS parameters, health")
    i.add_argument("index")
    i.add_argument("--json", action="store_true")
    i.add_argument("--verify", action="store_true", help="re-hash every file against the manifest")
    i.set_defaults(func=_cmd_info)

    v = sub.add_parser("verify", help="re-hash every file against the manifest's sha256 (exit 1 naming failures)")
    v.add_argument("index")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_cmd_verify)

    s = sub.add_parser("search", help="query an index from the command line")
    s.add_argument("index")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text")
    q.add_argument("--image")
    s.add_argument("--target", default="captions", choices=["captions", "images"])
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--candidates", type=int, default=100)
    s.add_argument("--mode", default="rerank", choices=["rerank", "global"])
    s.add_argument("--filters", help='JSON object, e.g. {"split": "test"}')
    s.add_argument("--explain", action="store_true")
    s.add_argument("--device")
    s.set_defaults(func=_cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("indexer: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except ValidationError as e:
        err = e.errors()[0]
        print(f"indexer: invalid option {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return EXIT_USER
    except (BuildError, InputError, IndexFormatError, FilterError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"indexer: {msg}", file=sys.stderr)
        return EXIT_USER
    except (OSError, json.JSONDecodeError) as e:
        print(f"indexer: {e}", file=sys.stderr)
        return EXIT_USER


if __name__ == "__main__":
    sys.exit(main())
