"""FAISS galleries of global vectors: build (train on a sample), save, load, search.

Every index is wrapped in `IndexIDMap2` so FAISS returns our item ids (metadata keys) and
`remove_ids` works where the inner index supports it (flat, IVF). HNSW cannot remove, so
tombstones are also excluded at search time through an ID selector. A GPU copy is used when
the installed FAISS has GPUs; nothing requires one.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from .config import FaissParams

_GPU_RES = None


def gpu_available() -> bool:
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # CPU-only builds may lack the symbol or the driver
        return False


def to_gpu(index):
    """A GPU copy where one is available and supports this index type, else the index itself."""
    global _GPU_RES
    if not gpu_available():
        return index
    try:
        if _GPU_RES is None:
            _GPU_RES = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(_GPU_RES, 0, index)
    except Exception:  # e.g. HNSW has no GPU version
        return index


def build_index(vectors: np.ndarray, ids: np.ndarray, params: FaissParams, seed: int = 0,
                add_step: int = 65536):
    """Train on a seeded sample, then add in steps (the input may be a memmap)."""
    n, dim = vectors.shape
    inner = faiss.index_factory(dim, params.factory, faiss.METRIC_INNER_PRODUCT)
    if params.kind == "hnsw":
        inner.hnsw.efConstruction = 80
    if not inner.is_trained:
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(n, params.train_size or n), replace=False))
        sample = np.ascontiguousarray(vectors[take], dtype=np.float32)
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None and ivf.nlist > sample.shape[0]:
            raise ValueError(f"{params.factory}: {sample.shape[0]} vectors cannot train {ivf.nlist} lists")
        train_on = to_gpu(inner) if params.kind in ("ivf", "flat") else inner
        train_on.train(sample)
        if train_on is not inner:
            inner = faiss.index_gpu_to_cpu(train_on)
    index = faiss.IndexIDMap2(inner)
    for s in range(0, n, add_step):
        index.add_with_ids(np.ascontiguousarray(vectors[s:s + add_step], dtype=np.float32),
                           np.ascontiguousarray(ids[s:s + add_step], dtype=np.int64))
    return index


def fill_like(template_path: Path, vectors: np.ndarray, ids: np.ndarray, add_step: int = 65536):
    """A copy of a saved gallery's trained structure (coarse quantizer, scalar quantizer, PQ
    codebooks), emptied, holding `vectors` instead: no training, so two galleries filled from one
    template partition the same lists."""
    index = faiss.read_index(str(template_path))
    if index.d != vectors.shape[1]:
        raise ValueError(f"{template_path.name} holds {index.d}-d vectors, this build {vectors.shape[1]}-d")
    index.reset()
    for s in range(0, len(vectors), add_step):
        add_vectors(index, vectors[s:s + add_step], ids[s:s + add_step])
    return index


def exact_top(blocks: list[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int,
              step: int = 262_144) -> np.ndarray:
    """Exact inner-product top-k ids of `queries` over (vectors, ids) blocks (memmaps are fine),
    read `step` rows at a time so memory stays bounded."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    for vectors, ids in blocks:
        for s in range(0, len(vectors), step):
            block = faiss.IndexFlatIP(q.shape[1])
            block.add(np.ascontiguousarray(vectors[s:s + step], dtype=np.float32))
            D, I = block.search(q, min(k, block.ntotal))
            got = np.asarray(ids[s:s + step])[np.maximum(I, 0)]
            heap.add_result(np.ascontiguousarray(D), np.ascontiguousarray(np.where(I >= 0, got, -1)))
    heap.finalize()
    return heap.I


def calibrate_nprobe(index, params: FaissParams, queries: np.ndarray, truth: np.ndarray,
                     target: float = 0.99) -> tuple[int, float]:
    """The smallest nprobe on a x1.5 grid (8, 12, 16, 24, 32, 48, ... up to the rule's) whose
    recall@k against `truth` (exact top-k ids of `queries`, from `exact_top`) reaches `target`.

    The rule's nprobe (nlist/32) is a safe guess for any data; measured on real queries, a
    half or a quarter of it is often enough, and FAISS time per query is linear in it: a grid of
    powers of two alone would overshoot by up to 2x (on the 1M bench: 64 where 48 reaches it).
    Returns (nprobe, its measured recall).
    """
    if params.kind not in ("ivf", "ivfpq") or not params.nprobe or len(queries) == 0:
        return params.nprobe or 0, 1.0
    k = truth.shape[1]
    nprobe, recall = params.nprobe, 1.0
    grid = {min(params.nprobe, m << i) for i in range(2, 16) for m in (2, 3)}
    for p in sorted(grid):
        _, got = search(index, queries, k, params.model_copy(update={"nprobe": p}))
        r = float(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, int((a >= 0).sum()))
                           for a, b in zip(truth, got)]))
        if r >= target or p == params.nprobe:
            nprobe, recall = p, r
            break
    return nprobe, recall


def add_vectors(index, vectors: np.ndarray, ids: np.ndarray) -> None:
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def remove_ids(index, ids: np.ndarray) -> int:
    """Remove where supported (flat, IVF); returns how many were removed (0 for HNSW)."""
    try:
        return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))
    except RuntimeError:
        return 0


def save(index, path: Path) -> None:
    faiss.write_index(index, str(path))


def load(path: Path, mmap: bool = False):
    """`mmap`: map the stored vectors instead of reading them into the heap (read-only use): the
    page cache holds one copy however many server processes search the same index, and a
    1M-image gallery loads in a fraction of a second. Searches cost the same once pages are warm."""
    flags = 0
    if mmap and hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        _read_through(path)
    return faiss.read_index(str(path), flags)


def _read_through(path: Path, step: int = 16 << 20) -> None:
    """Stream the file once so its pages are in the page cache: a mapped index that is not
    would fault its inverted lists in with random reads during the first searches (seconds of
    slow queries after a start or a swap), where one sequential read costs what a heap load did."""
    with open(path, "rb", buffering=0) as f:
        while f.read(step):
            pass


def search(index, queries: np.ndarray, k: int, params: FaissParams, allow: np.ndarray | None = None,
           deny: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) with the stored nprobe/efSearch; `allow`/`deny` restrict ids."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    sel = None
    keep = []
    if allow is not None:
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allow, dtype=np.int64))
        keep.append(sel)
    if deny is not None and len(deny):
        base = faiss.IDSelectorBatch(np.ascontiguousarray(deny, dtype=np.int64))
        neg = faiss.IDSelectorNot(base)
        keep += [base, neg]
        sel = neg if sel is None else faiss.IDSelectorAnd(sel, neg)
        keep.append(sel)
    if params.kind in ("ivf", "ivfpq"):
        sp = faiss.SearchParametersIVF(nprobe=int(params.nprobe or 1))
    elif params.kind == "hnsw":
        sp = faiss.SearchParametersHNSW(efSearch=max(int(params.ef_search or 64), k))
    else:
        sp = faiss.SearchParameters()
    if sel is not None:
        sp.sel = sel
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    if index.ntotal == 0:
        return np.full((q.shape[0], 0), -np.inf, np.float32), np.zeros((q.shape[0], 0), np.int64)
    D, I = index.search(q, k, params=sp)
    del keep
    return D, I
