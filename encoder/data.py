"""Collections in the `pairs.jsonl` form: a folder of images and one JSON line per image.

`{"image": "relative/path.jpg", "captions": [...], "split": "..."}`; any number of captions
(zero included); extra fields are kept as metadata. This is the unit the trainer, the
evaluation and the indexer all read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator


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


def pair_records(path: Path, split: str | None = None,
                 on_bad_line: Callable[[int, str], None] | None = None) -> Iterator[tuple[str, list[str], dict]]:
    """(image, captions, metadata) for each line of a pairs.jsonl file in `split` (None: all),
    in file order. The one reader of the format: the trainer, the evaluation and the indexer
    all go through it. `captions` may also be a single string or be named `caption`.

    A line that cannot be read raises `CollectionError` naming the file, the line and what is
    wrong with it (not UTF-8, not JSON, no 'image' field); with `on_bad_line(lineno, reason)`
    such lines are reported through it and skipped instead."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                rec, image = _pair_line(raw, lineno)
            except CollectionError as e:
                if on_bad_line is None:
                    raise CollectionError(f"{path}:{lineno}: {e}") from None
                on_bad_line(lineno, str(e))
                continue
            if rec is None or (split is not None and rec.get("split") != split):
                continue
            caps = rec.get("captions", rec.get("caption")) or []
            caps = [caps] if isinstance(caps, str) else [str(c) for c in caps]
            yield image, caps, {k: v for k, v in rec.items() if k not in ("image", "captions", "caption")}


def _pair_line(raw: bytes, lineno: int) -> tuple[dict | None, str]:
    """One JSONL line -> (record, image name); (None, "") for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise CollectionError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    if not line.strip():
        return None, ""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise CollectionError(f"JSON syntax error at column {e.colno}: {e.msg}") from None
    if not isinstance(rec, dict):
        raise CollectionError(f"expected a JSON object, got {type(rec).__name__}")
    image = rec.get("image")
    if not isinstance(image, str) or not image.strip():
        raise CollectionError("the object has no 'image' field (a path to the image file)" if image is None
                              else f"'image' must be a non-empty string, got {json.dumps(image)[:60]}")
    return rec, image


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
