"""The manifest: what an index directory holds and what made it, so it describes itself.

Readers check the format version and the checksums; the service and `encoder evaluate --index`
load the encoder the manifest names, and refuse an index built with another checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict

from .config import FORMAT_VERSION, FaissParams

MANIFEST = "manifest.json"
META = "meta.sqlite"
REPORT = "build_report.json"
CODEC = {"image": "image.codec", "caption": "caption.codec"}
FAISS = {"image": "images.faiss", "caption": "captions.faiss"}


class IndexFormatError(ValueError):
    """A directory that is not a readable index (missing, wrong version, corrupt)."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    created: str
    updated: str | None = None
    checkpoint: str | None  # path the encoder was loaded from (None = the package default)
    checkpoint_digest: str
    model: dict  # the ModelConfig JSON, for reference
    images_root: str
    dim: int  # global vectors (FAISS)
    token_dim: int | None = None  # token vectors; None (indexes before the label route): = dim
    image_tokens: int  # tokens per image (grid cells)
    grid: list[int]
    token_form: str
    token_row_bytes: int
    segments: list[str]
    faiss: dict[str, FaissParams]  # "image" / "caption"
    counts: dict[str, int]  # images, captions, deleted_images, deleted_captions
    files: dict[str, dict]  # name -> {"bytes", "sha256"}
    build: dict = {}

    @property
    def tokens_dim(self) -> int:
        return self.token_dim or self.dim


def sha256_file(path: Path, block: int = 8 << 20, stop: Callable[[], bool] | None = None,
                on_bytes: Callable[[int], None] | None = None) -> str | None:
    """The file's sha256 (hex); None when `stop()` turned true on the way (asked every block, so a
    background check of a 13 GB segment gives up within milliseconds); `on_bytes` hears every block."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            if stop is not None and stop():
                return None
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in sorted(names)}


def write_manifest(folder: Path, m: Manifest) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(m.model_dump_json(indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{folder}: not an index directory (no {MANIFEST})")
    try:
        m = Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as e:
        raise IndexFormatError(f"{path}: unreadable manifest: {str(e).splitlines()[0]}") from None
    if m.format_version != FORMAT_VERSION:
        raise IndexFormatError(f"{folder}: index format {m.format_version}, this version reads {FORMAT_VERSION}")
    return m


def segment_names(m: Manifest) -> list[str]:
    """The token segments among the checksummed files: the bulk of an index (13 GB at 1M images),
    which the service hashes in the background after a first load instead of before it."""
    return [n for n in m.segments if n in m.files]


def verify_files(folder: Path, m: Manifest, names: list[str] | None = None, hash: bool = True,
                 stop: Callable[[], bool] | None = None, on_bytes: Callable[[int], None] | None = None) -> list[str]:
    """Problems found comparing the files to the manifest's sizes and checksums (`hash=False`:
    presence and size only, instant).

    `names` limits the check to those files (default: every file the manifest lists); the
    problems name files relative to the index, never by their server path. `stop` is asked
    as it reads (a background check of an index being swapped out gives up; the problems found so
    far are returned); `on_bytes` hears the bytes hashed (progress)."""
    problems = []
    for name in sorted(m.files if names is None else names):
        want = m.files.get(name)
        p = Path(folder) / name
        if want is None:
            problems.append(f"{name}: not in the manifest")
        elif not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{name}: size {p.stat().st_size} != {want['bytes']}")
        elif hash:
            digest = sha256_file(p, stop=stop, on_bytes=on_bytes)
            if digest is None:
                break
            if digest != want["sha256"]:
                problems.append(f"{name}: checksum mismatch")
    return problems
