"""Collections in the `pairs.jsonl` form: a folder of images and one JSON line per image.

`{"image": "relative/path.jpg", "captions": [...], "split": "..."}`; any number of captions
(zero included); extra fields are kept as metadata. This is the unit the trainer, the
evaluation and the indexer all read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class CollectionError(ValueError):
    """A collection that cannot be read, with the reason."""


@dataclass
class Collection:
    root: Path
    images: list[str]  # paths relative to root
    captions: list[str]
    caption_image: list[int]  # index into images for each caption
    meta: list[dict] = field(default_factory=list)

    @property
    def image_paths(self) -> list[Path]:
        return [self.root / p for p in self.images]

    def __len__(self) -> int:
        return len(self.images)


def pair_records(path: Path, split: str | None = None) -> Iterator[tuple[str, list[str], dict]]:
    """(image, captions, metadata) for each line of a pairs.jsonl file in `split` (None: all),
    in file order. The one reader of the format: the trainer, the evaluation and the indexer
    all go through it. `captions` may also be a single string or be named `caption`."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image = rec["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CollectionError(f"{path}:{lineno}: expected a JSON object with an 'image' field") from None
            if split is not None and rec.get("split") != split:
                continue
            caps = rec.get("captions", rec.get("caption")) or []
            caps = [caps] if isinstance(caps, str) else [str(c) for c in caps]
            yield str(image), caps, {k: v for k, v in rec.items() if k not in ("image", "captions", "caption")}


def load_pairs(root: str | Path, pairs_file: str = "pairs.jsonl", split: str | None = None,
               limit: int | None = None) -> Collection:
    """Read a pairs.jsonl collection; `split=None` takes every line."""
    root = Path(root)
    path = Path(pairs_file) if Path(pairs_file).is_absolute() else root / pairs_file
    if not path.is_file():
        raise CollectionError(f"no captions file at {path}")
    images: list[str] = []
    captions: list[str] = []
    owner: list[int] = []
    meta: list[dict] = []
    for image, caps, extra in pair_records(path, split):
        idx = len(images)
        images.append(image)
        meta.append(extra)
        captions.extend(caps)
        owner.extend([idx] * len(caps))
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise CollectionError(f"{path}: no images" + (f" in split {split!r}" if split else ""))
    return Collection(root, images, captions, owner, meta)
