"""The main-job demo: build a demo index if it is missing, then serve it.

`service demo` (or `python -m service.demo`). The data is, in order of preference:
1. `../shared/data/flickr8k` beside the checkout (read in place, never copied): its **test
   split** (1,000 images, 5,000 captions) by default, or every image with `--split all`;
2. otherwise the real photographs that ship inside scikit-image (`skimage.data`: the
   astronaut, the coffee cup, Chelsea the cat, the rocket launch, ...), captioned with their
   documented descriptions, so the demo runs on any fresh machine without a download.
The index lands in `<repo>/.cache/demo/<source>` and is rebuilt when the model changes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from encoder.model import DEFAULT_CHECKPOINT, checkpoint_digest
from indexer.build import build
from indexer.config import BuildConfig
from indexer.manifest import read_manifest

from .serve import EXIT_USER, serve, settings_from_args

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"
CACHE = REPO / ".cache" / "demo"

# skimage.data photographs (not synthetic test patterns or logos), all bundled with the package.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "camera", "coins", "moon", "brick", "grass", "gravel", "cell", "clock", "page")


class DemoError(RuntimeError):
    """The demo cannot be set up (no model, unreadable data), with the reason."""


def skimage_captions(name: str) -> list[str]:
    """The documented description of a `skimage.data` image: summary line + first prose sentence."""
    doc = (getattr(skimage.data, name).__doc__ or "").strip()
    paras = [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]
    caps = [paras[0].rstrip(".")] if paras else [name.replace("_", " ")]
    if len(paras) > 1 and not paras[1].startswith(("Returns", "Notes", "Parameters", "..")):
        first = paras[1].split(". ")[0].rstrip(".")
        if first and first not in caps:
            caps.append(first)
    return caps


def write_skimage_collection(root: Path) -> Path:
    """skimage.data photos as JPEGs + a pairs.jsonl (the indexer's caption format)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    pairs = root / "pairs.jsonl"
    with pairs.open("w", encoding="utf-8") as f:
        for name in SKIMAGE_PHOTOS:
            arr = np.asarray(getattr(skimage.data, name)())
            if arr.dtype != np.uint8:
                arr = (255 * (arr.astype(np.float32) / max(1.0, float(arr.max())))).astype(np.uint8)
            Image.fromarray(arr).convert("RGB").save(root / "images" / f"{name}.jpg", quality=92)
            f.write(json.dumps({"image": f"images/{name}.jpg", "captions": skimage_captions(name),
                                "source": "skimage.data", "name": name}) + "\n")
    return pairs


def demo_source(data: Path | None = None, cache: Path = CACHE) -> tuple[str, Path]:
    root = data or FLICKR
    if (root / "pairs.jsonl").is_file():
        return "flickr8k", root
    return "skimage", cache / "skimage-photos"


def _up_to_date(index_dir: Path, checkpoint: Path | None) -> bool:
    try:
        return read_manifest(index_dir).checkpoint_digest == checkpoint_digest(checkpoint)
    except Exception:
        return False


def ensure_demo_index(index_dir: Path | None = None, data: Path | None = None, checkpoint: Path | None = None,
                      split: str = "test", device: str | None = None, progress: bool = True) -> Path:
    """Return a demo index directory, building it first when missing or built with another model."""
    if checkpoint is None and not Path(DEFAULT_CHECKPOINT).exists():
        raise DemoError(f"no default model at {DEFAULT_CHECKPOINT}; train one (`encoder train`) or pass --checkpoint")
    cache = Path(index_dir).parent if index_dir else CACHE
    kind, root = demo_source(data, cache)
    name = f"flickr8k-{split}" if kind == "flickr8k" else "skimage"
    index_dir = Path(index_dir) if index_dir else CACHE / name
    if index_dir.is_dir() and _up_to_date(index_dir, checkpoint):
        print(f"service demo: using the existing index {index_dir}", file=sys.stderr)
        return index_dir
    if kind == "skimage":
        write_skimage_collection(root)
        print(f"service demo: {FLICKR} not found; indexing {len(SKIMAGE_PHOTOS)} scikit-image photos", file=sys.stderr)
    else:
        print(f"service demo: indexing {root} ({'all images' if split == 'all' else split + ' split'})",
              file=sys.stderr)
    cfg = BuildConfig(images=str(root), captions=str(root / "pairs.jsonl"), out=str(index_dir),
                      checkpoint=str(checkpoint) if checkpoint else None, overwrite=True,
                      split=None if (kind == "skimage" or split == "all") else split, device=device, progress=progress)
    build(cfg)
    return index_dir


def demo_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="service demo", description="Build the demo index if missing, then serve it.")
    p.add_argument("--data", type=Path, help=f"a pairs.jsonl collection (default: {FLICKR}, else scikit-image photos)")
    p.add_argument("--split", default="test", help="flickr8k split to index: test (default), train, val or all")
    p.add_argument("--index", type=Path, help=f"where the demo index lives (default: under {CACHE})")
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (default: the committed default model)")
    p.add_argument("--device", help="torch device (default: CUDA when present, else CPU)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--config", type=Path, help="TOML or JSON settings file")
    p.add_argument("--build-only", action="store_true", help="build the index and exit")
    args = p.parse_args(argv)
    try:
        index_dir = ensure_demo_index(args.index, args.data, args.checkpoint, args.split, args.device)
    except DemoError as e:
        print(f"service demo: {e}", file=sys.stderr)
        return EXIT_USER
    except Exception as e:  # build errors (bad data, bad checkpoint) are reported in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"service demo: cannot build the demo index: {msg}", file=sys.stderr)
        return EXIT_USER
    if args.build_only:
        print(index_dir)
        return 0
    args.index = index_dir
    return serve(settings_from_args(args), index_dir)


if __name__ == "__main__":
    raise SystemExit(demo_main())
