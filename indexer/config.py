"""Typed options of the offline index: what a build is asked to do, and the FAISS choice.

One pydantic object per concern so the CLI, the tests and the benchmarks pass the same thing,
and the manifest can record exactly what produced an index.
"""
from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FORMAT_VERSION = 1
FaissKind = Literal["auto", "flat", "ivf", "hnsw", "ivfpq"]
TOKEN_FORM_RE = re.compile(r"^(fp16|fp32|int8|pq\d+|opq\d+)$")

# `auto` thresholds (vectors in one gallery). Why these numbers, measured in BENCHMARKS.md:
#  - up to FLAT_MAX an exact scan costs ~n*D*4 bytes read per query (200k x 256-d = 200 MB/s of
#    queries at ~10 ms on 2 cores), so exactness is affordable and there is nothing to train;
#  - beyond it, IVF with nlist ~ 4*sqrt(n) and nprobe = nlist/32 (>= 16) keeps recall@100
#    near 0.99 while touching ~3 % of the vectors; the lists hold the vectors as fp16 (SQfp16):
#    half the bytes to scan per query and to keep in RAM, ranking unchanged (stage two
#    re-scores every candidate from the stored float32 vector anyway);
#  - beyond IVFPQ_MIN the float vectors themselves stop fitting comfortably in RAM (8M x 256-d
#    x 4 B = 8 GiB), so the lists hold PQ codes (D/4 bytes each) instead.
FLAT_MAX = 200_000
IVFPQ_MIN = 8_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaissParams(_Strict):
    """What was built and the search-time knobs the service must use with it."""

    kind: Literal["flat", "ivf", "hnsw", "ivfpq"]
    factory: str  # faiss.index_factory string of the wrapped index
    nprobe: int | None = None
    ef_search: int | None = None
    train_size: int = 0
    recall: float | None = None  # recall@100 measured at `nprobe` when the build calibrated it


def _pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def rule_nprobe(nlist: int) -> int:
    """nprobe for `nlist` lists when nothing has been measured (the size rule above)."""
    return min(nlist, max(16, nlist // 32))


def choose_faiss(n: int, dim: int, kind: str = "auto") -> FaissParams:
    """The FAISS index for a gallery of `n` vectors of `dim` (rule above for `auto`)."""
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX else ("ivf" if n < IVFPQ_MIN else "ivfpq")
    # the lists need ~39 training points per centroid; small galleries get fewer lists
    nlist = max(1, min(_pow2(4 * math.sqrt(max(n, 1))), max(1, n // 39)))
    nprobe = rule_nprobe(nlist)
    if kind == "flat":
        return FaissParams(kind="flat", factory="Flat")
    if kind == "ivf":
        return FaissParams(kind="ivf", factory=f"IVF{nlist},SQfp16", nprobe=nprobe, train_size=min(n, 64 * nlist))
    if kind == "ivfpq":
        m = max(1, dim // 4)
        while dim % m:
            m -= 1
        # 8-bit codebooks want ~39 x 256 training points; small galleries get smaller codebooks
        nbits = 8 if n >= 256 * 39 else max(1, min(8, int(math.log2(max(2, n // 39)))))
        return FaissParams(kind="ivfpq", factory=f"IVF{nlist},PQ{m}x{nbits}np", nprobe=nprobe,
                           train_size=min(n, max(64 * nlist, 256 * 40)))
    if kind == "hnsw":
        return FaissParams(kind="hnsw", factory="HNSW32,Flat", ef_search=128)
    raise ValueError(f"unknown FAISS kind {kind!r}; choose auto, flat, ivf, hnsw or ivfpq")


class BuildConfig(_Strict):
    """Everything `indexer build` needs; the CLI fills it from its flags."""

    images: str
    captions: str | None = None
    out: str
    checkpoint: str | None = None
    faiss: FaissKind = "auto"
    tokens: str = "fp16"
    overwrite: bool = False
    split: str | None = None
    id_field: str | None = None  # the captions file's own image id field (default: `id` where present)
    allow_missing: bool = False  # build even when most images a captions file names are missing
    skip_bad_lines: bool = False  # skip (and report) unreadable captions lines instead of stopping
    batch_size: int = 64
    caption_batch: int = 256
    workers: int = 1
    device: str | None = None
    progress: bool = True
    codec_train_tokens: int = 65536  # token vectors sampled to train a pq/opq codec
    # IVF galleries: search with the smallest nprobe whose measured recall@100 reaches this
    # (queries: the other modality's vectors in the index; without them, or with None, the
    # size rule's nprobe stays)
    nprobe_recall: float | None = Field(0.99, gt=0, le=1)
    # an index directory (same model) whose trained FAISS galleries this build reuses, empty,
    # with their nprobe, instead of training its own: shards of one collection built like one
    # index probe the same lists, so their exact merge answers as that index does
    faiss_like: str | None = None

    @field_validator("tokens")
    @classmethod
    def _form(cls, v: str) -> str:
        if not TOKEN_FORM_RE.match(v):
            raise ValueError(f"unknown token form {v!r}; use fp16, fp32, int8, pqM or opqM (e.g. pq32)")
        return v
