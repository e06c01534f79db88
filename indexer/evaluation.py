"""`encoder evaluate --index DIR`: the evaluation of what the service serves.

The index's own items (a split of them, by a metadata filter) are the queries: captions and
images are encoded fresh by the index's encoder with the text runtime the service uses, then
searched through the index (its FAISS, its stored, possibly compressed tokens) by
`encoder.ranking.rank`, the pipeline behind `Searcher.search_text` / `search_image`. So the
rsum printed is the rsum a client gets from the HTTP API.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from encoder.config import ScoreConfig
from encoder.data import Collection
from encoder.evaluate import MODES, encode_collection, evaluate

from . import metadata
from .searcher import Searcher


def index_collection(searcher: Searcher, filters: dict | None = None) -> tuple[Collection, np.ndarray, np.ndarray]:
    """The live images matching `filters` and their live captions (matching too), as a
    collection of files and texts, with their index ids (images, captions)."""
    con = searcher._con()
    img_ids = np.array(metadata.matching_ids(con, "image", filters, searcher.metadata_fields), np.int64)
    cap_ids = np.array(metadata.matching_ids(con, "caption", filters, searcher.metadata_fields), np.int64)
    img_ids = img_ids[np.isin(img_ids, searcher.tables["image"].live_ids)]
    rows = {r["id"]: r for r in con.execute("SELECT id, kind, path, caption, image_id FROM items WHERE deleted=0")}
    pos = {int(i): p for p, i in enumerate(img_ids)}
    cap_ids = np.array([c for c in cap_ids if int(c) in rows and rows[int(c)]["image_id"] in pos], np.int64)
    col = Collection(root=Path(searcher.manifest.images_root),
                     images=[rows[int(i)]["path"] for i in img_ids],
                     captions=[rows[int(c)]["caption"] for c in cap_ids],
                     caption_image=[pos[rows[int(c)]["image_id"]] for c in cap_ids])
    return col, img_ids, cap_ids


def evaluate_index(searcher: Searcher, filters: dict | None = None, k: int = 100, modes: Sequence[str] = MODES,
                   score: ScoreConfig | None = None, workers: int = 1, progress: bool = True,
                   rankings: dict | None = None) -> tuple[dict, Collection]:
    """Metrics of the index's items (matching `filters`) searched through the index; `rankings`
    receives the ranked index ids per mode and direction (see `encoder.evaluate.evaluate`)."""
    col, img_ids, cap_ids = index_collection(searcher, filters)
    if not len(img_ids) or not len(cap_ids):
        raise ValueError(f"the index holds no live images with captions{' matching ' + str(filters) if filters else ''}")
    images, captions = encode_collection(searcher.encoder, col, workers=workers, progress=progress)
    restrict = len(img_ids) != len(searcher.tables["image"].live_ids) or \
        len(cap_ids) != len(searcher.tables["caption"].live_ids)
    res = evaluate(searcher, images, captions, torch.tensor(col.caption_image), score or searcher.score, k, modes,
                   img_ids, cap_ids, restrict=restrict, rankings=rankings)
    return res, col
