"""What to index: a folder of images plus optional captions (JSONL, COCO JSON or CSV).

All three caption formats reduce to one list of `Entry` (image path, its captions, its extra
fields), in a deterministic order, so a resumed build walks exactly the same sequence as the
first attempt. Captions that name images which are not there are collected, not fatal.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from encoder.data import CollectionError, pair_records

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_IMAGE_COLS = ("image", "file_name", "filename", "path", "image_path")
_CAPTION_COLS = ("caption", "captions", "text", "sentence")


class InputError(ValueError):
    """Inputs that cannot be read at all (as opposed to single bad images, which are reported)."""


@dataclass
class Entry:
    path: str  # relative to the images root, POSIX separators
    captions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class Source:
    root: Path
    entries: list[Entry]
    missing: list[dict]  # {"path", "reason"} for images a captions file names but that do not exist


def discover_images(root: Path) -> list[str]:
    """Every image file under root (recursive), sorted, as relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _add(table: dict[str, Entry], order: list[str], image: str, caps, meta: dict) -> None:
    image = str(image).replace("\\", "/")
    if isinstance(caps, str):
        caps = [caps]
    e = table.get(image)
    if e is None:
        e = table[image] = Entry(image)
        order.append(image)
    e.captions.extend(str(c) for c in (caps or []) if str(c).strip())
    for k, v in meta.items():
        e.meta.setdefault(k, v)


def _read_jsonl(path: Path, split: str | None, table: dict, order: list) -> None:
    try:
        for image, caps, meta in pair_records(path, split):
            _add(table, order, image, caps, meta)
    except CollectionError as e:
        raise InputError(str(e)) from None


def _read_coco(path: Path, split: str | None, table: dict, order: list) -> None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        images = {im["id"]: im for im in doc["images"]}
        anns = doc.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a COCO captions file (needs 'images' with id/file_name): {e}") from None
    caps: dict = {}
    for a in anns:
        try:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        except (KeyError, TypeError):
            raise InputError(f"{path}: annotation without image_id/caption: {a!r}"[:300]) from None
    for iid, im in images.items():
        if split is not None and im.get("split") != split:
            continue
        meta = {("coco_id" if k == "id" else k): v for k, v in im.items() if k != "file_name"}
        _add(table, order, im["file_name"], caps.get(iid, []), meta)


def _read_csv(path: Path, split: str | None, table: dict, order: list) -> None:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        icol = next((c for c in _IMAGE_COLS if c in cols), None)
        ccol = next((c for c in _CAPTION_COLS if c in cols), None)
        if icol is None:
            raise InputError(f"{path}: CSV needs an image column (one of {', '.join(_IMAGE_COLS)}); has {cols}")
        for row in reader:
            if split is not None and row.get("split") != split:
                continue
            meta = {k: v for k, v in row.items() if k not in (icol, ccol) and k is not None}
            _add(table, order, row[icol], [row[ccol]] if ccol and row.get(ccol) else [], meta)


def read_source(images: str | Path, captions: str | Path | None = None, split: str | None = None) -> Source:
    """Entries to index. With a captions file, its images come first in file order; folder
    images it does not name are added (uncaptioned) unless a split restricts the selection."""
    root = Path(images)
    if not root.is_dir():
        raise InputError(f"--images {root}: not a directory")
    table: dict[str, Entry] = {}
    order: list[str] = []
    if captions is not None:
        cpath = Path(captions)
        if not cpath.is_file():
            raise InputError(f"--captions {cpath}: no such file")
        suffix = cpath.suffix.lower()
        reader = {".jsonl": _read_jsonl, ".json": _read_coco, ".csv": _read_csv}.get(suffix)
        if reader is None:
            raise InputError(f"--captions {cpath}: unknown format (use .jsonl, COCO .json or .csv)")
        reader(cpath, split, table, order)
    missing: list[dict] = []
    entries: list[Entry] = []
    resolved_root = root.resolve()
    for name in order:
        p = (root / name).resolve()
        if resolved_root not in p.parents:
            missing.append({"path": name, "reason": "outside the images folder"})
        elif not p.is_file():
            missing.append({"path": name, "reason": "named in the captions file but not found"})
        else:
            entries.append(table[name])
    if captions is None or split is None:
        named = set(order)
        entries.extend(Entry(p) for p in discover_images(root) if p not in named)
    if not entries:
        raise InputError(f"no images to index under {root}" + (f" for split {split!r}" if split else ""))
    return Source(root, entries, missing)
