"""What to index: a folder of images plus optional captions (JSONL, COCO JSON or CSV).

All three caption formats reduce to one list of `Entry` (image path, its captions, its extra
fields, the user's own id), in a deterministic order, so a resumed build walks exactly the same
sequence as the first attempt.

Where a captions file's images are: a name is read relative to the captions file's own folder
(the JSONL convention) and, when no file is there, relative to `--images`. Either way it must
land inside `--images`, judged from the name as written (no absolute names, no `..` that leaves
the folder) and never from where a symbolic link points: collections laid out as links (DVC,
git-annex, dataset tools, shared drives) index like any other. Every path is stored normalised
and relative to `--images` (`sub/../x.jpg` is `x.jpg`).

Captions that name images which are not there are collected, not fatal, unless most of them are
missing: that is a wrong folder, and it stops the build (`allow_missing` overrides).
"""
from __future__ import annotations

import csv
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from encoder.data import CollectionError, pair_records

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_IMAGE_COLS = ("image", "file_name", "filename", "path", "image_path")
_CAPTION_COLS = ("caption", "captions", "text", "sentence")
DEFAULT_ID_FIELD = "id"


class InputError(ValueError):
    """Inputs that cannot be read at all (as opposed to single bad images, which are reported)."""


@dataclass
class Entry:
    path: str  # relative to the images root, POSIX separators, normalised
    captions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    user_id: str | int | None = None  # the captions file's own id of this image (`id_field`)


@dataclass
class Source:
    root: Path
    entries: list[Entry]
    missing: list[dict]  # {"path", "reason"} for images a captions file names but that do not exist
    bad_lines: list[dict] = field(default_factory=list)  # {"path": "file:line", "reason"} skipped lines


@dataclass
class _Record:
    name: str  # the image as the captions file writes it
    captions: list[str]
    meta: dict
    user_id: Any = None


def discover_images(root: Path) -> list[str]:
    """Every image file under root (recursive, through linked folders too, each real folder
    once), sorted, as relative POSIX paths."""
    found, seen = [], set()
    for folder, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree (or a second link to one folder): walked already
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs.sort()  # a deterministic walk: which of two links to one folder counts is always the same
        rel = Path(os.path.relpath(folder, root))
        found += [(rel / f).as_posix().removeprefix("./") for f in files
                  if Path(f).suffix.lower() in IMAGE_EXTS and os.path.isfile(os.path.join(folder, f))]
    return sorted(found)


def _user_id(v: Any) -> str | int | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    return v if isinstance(v, (str, int)) and not isinstance(v, bool) else str(v)


# ------------------------------------------------------------------ the three formats
def _read_jsonl(path: Path, split: str | None, id_field: str, bad: list[dict] | None) -> Iterator[_Record]:
    def skip(lineno: int, reason: str) -> None:
        bad.append({"path": f"{path.name}:{lineno}", "reason": reason})

    try:
        for image, caps, meta in pair_records(path, split, on_bad_line=None if bad is None else skip):
            yield _Record(image, caps, meta, meta.get(id_field))
    except CollectionError as e:
        hint = "; --skip-bad-lines skips such lines" if bad is None else ""
        raise InputError(f"{e}{hint}") from None


def _read_coco(path: Path, split: str | None, id_field: str, bad: list[dict] | None) -> Iterator[_Record]:
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: JSON syntax error at column {e.colno}: {e.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise InputError(f"{path}: not a COCO captions file (needs an 'images' list of {{id, file_name}})")
    anns = doc.get("annotations", [])
    if not isinstance(anns, list):
        raise InputError(f"{path}: 'annotations' must be a list")
    caps: dict = {}
    for n, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise InputError(f"{path}: annotations[{n}] needs 'image_id' and a 'caption' string: {a!r}"[:300])
        caps.setdefault(a["image_id"], []).append(a["caption"])
    for n, im in enumerate(doc["images"]):
        if not isinstance(im, dict):
            raise InputError(f"{path}: images[{n}] is not an object")
        for key in ("id", "file_name"):
            if key not in im:
                raise InputError(f"{path}: images[{n}] has no {key!r} field"
                                 + (f" (its id is {im['id']!r})" if key == "file_name" else ""))
        if not isinstance(im["file_name"], str) or not im["file_name"].strip():
            raise InputError(f"{path}: images[{n}] (id {im['id']!r}): 'file_name' must be a non-empty string")
        if split is not None and im.get("split") != split:
            continue
        meta = {("coco_id" if k == "id" else k): v for k, v in im.items() if k != "file_name"}
        yield _Record(im["file_name"], caps.get(im["id"], []), meta, im.get(id_field))


def _utf8_lines(path: Path, f) -> Iterator[str]:
    for lineno, raw in enumerate(f, 1):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                             f"{e.start + 1}); save the file as UTF-8") from None


def _read_csv(path: Path, split: str | None, id_field: str, bad: list[dict] | None) -> Iterator[_Record]:
    with path.open("rb") as f:
        reader = csv.DictReader(_utf8_lines(path, f))
        try:
            cols = reader.fieldnames or []
            icol = next((c for c in _IMAGE_COLS if c in cols), None)
            ccol = next((c for c in _CAPTION_COLS if c in cols), None)
            if icol is None:
                raise InputError(f"{path}: CSV needs an image column (one of {', '.join(_IMAGE_COLS)}); has {cols}")
            for row in reader:
                name = row.get(icol)
                if not name or not name.strip():
                    reason = f"no value in the {icol!r} column"
                    if bad is None:
                        raise InputError(f"{path}:{reader.line_num}: {reason}; --skip-bad-lines skips such lines")
                    bad.append({"path": f"{path.name}:{reader.line_num}", "reason": reason})
                    continue
                if split is not None and row.get("split") != split:
                    continue
                meta = {k: v for k, v in row.items() if k not in (icol, ccol) and k is not None}
                yield _Record(name, [row[ccol]] if ccol and row.get(ccol) else [], meta, row.get(id_field))
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: not valid CSV: {e}") from None


READERS = {".jsonl": _read_jsonl, ".json": _read_coco, ".csv": _read_csv}


# ------------------------------------------------------------------ where the named images are
def relative_inside(base: str | Path, name: str, root: str | Path) -> str | None:
    """`base/name` relative to `root` (POSIX, normalised) when it lies inside it, else None.

    Judged on the name as written (`..` and all), never by following a link it names: first
    lexically, then -- for a base or root folder reached through a link of its own -- with the
    two folders' real locations. Only those folders are resolved, never the name."""
    for b, r in ((os.path.abspath(base), os.path.abspath(root)), (os.path.realpath(base), os.path.realpath(root))):
        rel = os.path.relpath(os.path.normpath(os.path.join(b, name)), r)
        if rel != ".." and not rel.startswith(".." + os.sep) and not os.path.isabs(rel):
            return Path(rel).as_posix()
    return None


class _Locator:
    """Maps a captions file's image names to paths relative to the images root."""

    def __init__(self, root: Path, captions_file: Path):
        self.root = root
        self.bases = [captions_file.parent]
        if os.path.abspath(captions_file.parent) != os.path.abspath(root):
            self.bases.append(root)

    def locate(self, name: str) -> tuple[str | None, str]:
        """(relative path, "") or (None, why it is not indexed)."""
        name = name.strip().replace("\\", "/")
        if posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
            return None, "absolute path: name images relative to the captions file or --images"
        inside = []
        for base in self.bases:
            rel = relative_inside(base, posixpath.normpath(name), self.root)
            if rel is None:
                continue
            inside.append(base)
            if (self.root / rel).is_file():
                return rel, ""
        if not inside:
            return None, "outside the images folder"
        return None, "named in the captions file but not found"

    def looked_in(self) -> str:
        return " and ".join(str(b) for b in self.bases)


def _examples(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def read_source(images: str | Path, captions: str | Path | None = None, split: str | None = None,
                id_field: str | None = None, allow_missing: bool = False,
                skip_bad_lines: bool = False) -> Source:
    """Entries to index. With a captions file, its images come first in file order; folder
    images it does not name are added (uncaptioned) unless a split restricts the selection.

    `id_field` names the captions file's own id of an image (default: `id` where present);
    `allow_missing` builds even when most named images are missing; `skip_bad_lines` skips
    (and reports) unreadable JSONL/CSV lines instead of stopping."""
    root = Path(images)
    if not root.exists():
        raise InputError(f"--images {root}: no such folder")
    if not root.is_dir():
        raise InputError(f"--images {root}: not a folder")
    table: dict[str, Entry] = {}
    missing: list[dict] = []
    bad: list[dict] = []
    named = 0
    if captions is not None:
        cpath = Path(captions)
        if not cpath.is_file():
            raise InputError(f"--captions {cpath}: no such file")
        reader = READERS.get(cpath.suffix.lower())
        if reader is None:
            raise InputError(f"--captions {cpath}: unknown format (use .jsonl, COCO .json or .csv)")
        locator = _Locator(root, cpath)
        field_name = id_field or DEFAULT_ID_FIELD
        seen_names: dict[str, str | None] = {}  # name as written -> relative path (None: missing)
        ids_found = 0
        try:
            for rec in reader(cpath, split, field_name, bad if skip_bad_lines else None):
                if rec.name not in seen_names:
                    rel, reason = locator.locate(rec.name)
                    seen_names[rec.name] = rel
                    if rel is None:
                        missing.append({"path": rec.name, "reason": reason})
                rel = seen_names[rec.name]
                if rel is None:
                    continue
                e = table.get(rel)
                if e is None:
                    e = table[rel] = Entry(rel)
                e.captions.extend(str(c) for c in rec.captions if str(c).strip())
                for k, v in rec.meta.items():
                    e.meta.setdefault(k, v)
                if e.user_id is None and _user_id(rec.user_id) is not None:
                    e.user_id = _user_id(rec.user_id)
                    ids_found += 1
        except OSError as e:
            raise InputError(f"--captions {cpath}: cannot read it: {e.strerror or e}") from None
        named = len(seen_names)
        if id_field is not None and named and not ids_found:
            raise InputError(f"--id-field {id_field}: no image in {cpath} has that field")
        if missing and len(missing) * 2 > named and not allow_missing:
            raise InputError(
                f"{len(missing)} of the {named} images named in {cpath} are not there "
                f"(e.g. {_examples([m['path'] for m in missing])}; looked for them in {locator.looked_in()}): "
                f"is --images the right folder? --allow-missing indexes the rest anyway")
    entries = list(table.values())
    if captions is None or split is None:
        entries.extend(Entry(p) for p in discover_images(root) if p not in table)
    if not entries:
        what = f"no images to index under {root}" + (f" for split {split!r}" if split else "")
        if named:
            what += f": none of the {named} images named in {captions} is there"
        raise InputError(what)
    return Source(root, entries, missing, bad)
