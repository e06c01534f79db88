"""What `indexer info` reports (and `Searcher.info` exposes): counts, sizes, model, FAISS, health."""
from __future__ import annotations

from pathlib import Path

from .manifest import Manifest, read_manifest, verify_files


def token_bytes_per_image(m: Manifest) -> int:
    return int(m.token_row_bytes * m.image_tokens)


def index_info(folder: str | Path, manifest: Manifest | None = None, verify: bool = False,
               faiss_ntotal: dict[str, int] | None = None) -> dict:
    """A JSON-ready description; `verify` re-hashes every file (slow on big indexes)."""
    folder = Path(folder)
    m = manifest or read_manifest(folder)
    problems = verify_files(folder, m, hash=verify)
    faiss = {k: {**v.model_dump(), **({"ntotal": faiss_ntotal[k]} if faiss_ntotal else {})}
             for k, v in m.faiss.items()}
    return {
        "path": str(folder.resolve()),
        "format_version": m.format_version,
        "created": m.created,
        "updated": m.updated,
        "images": m.counts["images"] - m.counts.get("deleted_images", 0),
        "captions": m.counts["captions"] - m.counts.get("deleted_captions", 0),
        "deleted_images": m.counts.get("deleted_images", 0),
        "deleted_captions": m.counts.get("deleted_captions", 0),
        "dim": m.dim,
        "grid": m.grid,
        "image_tokens": m.image_tokens,
        "token_form": m.token_form,
        "token_bytes_per_image": token_bytes_per_image(m),
        "model": {
            "checkpoint": m.checkpoint or "default",
            "checkpoint_digest": m.checkpoint_digest,
            "image_backbone": m.model.get("image_backbone", {}).get("kind"),
            "text_backbone": m.model.get("text_backbone", {}).get("kind"),
            "embed_dim": m.model.get("embed_dim"),
        },
        "images_root": m.images_root,
        "faiss": faiss,
        "segments": m.segments,
        "bytes": sum(f["bytes"] for f in m.files.values()),
        "files": m.files,
        "build": m.build,
        "health": {"ok": not problems, "checked": "sha256" if verify else "presence and size", "problems": problems},
    }
