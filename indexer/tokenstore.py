"""The token store: per-item token embeddings in HDF5, laid out for the re-rank gather.

Re-ranking reads ~100 random items' token blocks per query. h5py fancy indexing on a chunked
dataset costs tens of ms for that; one contiguous, uncompressed dataset read through a numpy
memmap at its file offset costs well under a few ms. So every segment file holds, per kind
("image", "caption"), one contiguous `rows` dataset of fixed-size encoded token rows
(uint8 records, `row_bytes` wide, the codec says how to decode) plus `offsets`/`lengths` per
item, `global` float32 vectors and `ids`.

During a build the rows are appended to plain files (append + truncate is what makes resume
safe: a killed write is cut back to the last committed length); `write_segment` turns them
into the HDF5 segment at the end.

Codecs: fp16 (default, exact enough), fp32, int8 with a per-token fp16 scale, and product
quantisation (`pqM`, `opqM`: M bytes per token, FAISS's trained PQ/OPQ, in the spirit of
ColBERTv2's compressed residuals). A token's length carries meaning (caption tokens are scaled
by their learned word salience), so lengths are kept: int8's per-token scale keeps it, and PQ
codes the direction (trained on unit vectors) plus the length as fp16 (2 more bytes).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import h5py
import numpy as np
import torch

KINDS = ("image", "caption")
SCORE_CHUNK = 1024  # rows widened to float per GEMM in `TokenCodec.scores`: 1 MB at D=256, cache-resident


class TokenCodec:
    """Encode float32 token rows [n, D] to uint8 records [n, row_bytes] and back."""

    def __init__(self, form: str, dim: int, faiss_index=None):
        self.form, self.dim = form, dim
        self._index = faiss_index
        if form in ("fp16", "fp32", "int8"):
            self.row_bytes = {"fp16": 2 * dim, "fp32": 4 * dim, "int8": dim + 2}[form]
        else:
            if self._index is None:
                m = int(form.lstrip("opq"))
                if dim % m:
                    raise ValueError(f"token form {form}: {m} sub-quantisers do not divide dim {dim}")
                # "np": no polysemous training (slow simulated annealing we do not use)
                spec = f"OPQ{m},PQ{m}np" if form.startswith("opq") else f"PQ{m}np"
                self._index = faiss.index_factory(dim, spec)
            self.row_bytes = self._index.sa_code_size() + 2  # + fp16 length

    @property
    def needs_training(self) -> bool:
        return self._index is not None and not self._index.is_trained

    @property
    def lossy(self) -> bool:
        return self.form not in ("fp32", "fp16")

    def train(self, x: np.ndarray) -> None:
        if self._index is not None:
            x, _ = _unit(x)
            self._index.train(np.ascontiguousarray(x[np.linalg.norm(x, axis=1) > 0]))

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        if self.form == "fp16":
            return x.astype(np.float16).view(np.uint8).reshape(n, self.row_bytes)
        if self.form == "fp32":
            return x.view(np.uint8).reshape(n, self.row_bytes)
        if self.form == "int8":
            scale = (np.abs(x).max(axis=1, keepdims=True) / 127.0).astype(np.float16)
            s32 = scale.astype(np.float32)
            q = np.where(s32 > 0, np.rint(x / np.where(s32 > 0, s32, 1.0)), 0.0)
            q = np.clip(q, -127, 127).astype(np.int8)
            return np.concatenate([q.view(np.uint8), scale.view(np.uint8).reshape(n, 2)], axis=1)
        unit, norm = _unit(x)
        codes = self._index.sa_encode(unit) if n else np.zeros((0, self.row_bytes - 2), np.uint8)
        return np.concatenate([codes, norm.astype(np.float16).view(np.uint8).reshape(n, 2)], axis=1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        n = codes.shape[0]
        if self.form == "fp16":
            return codes.view(np.float16).reshape(n, self.dim).astype(np.float32)
        if self.form == "fp32":
            return codes.view(np.float32).reshape(n, self.dim).copy()
        if self.form == "int8":
            q = codes[:, : self.dim].view(np.int8).astype(np.float32)
            return q * codes[:, self.dim:].copy().view(np.float16).astype(np.float32)
        norm = codes[:, -2:].copy().view(np.float16).astype(np.float32)
        x = self._index.sa_decode(np.ascontiguousarray(codes[:, :-2])) if n else np.zeros((0, self.dim), np.float32)
        return _unit(x)[0] * norm

    def scores(self, query: torch.Tensor, codes: np.ndarray) -> torch.Tensor:
        """query [T, D] . decode(codes)^T -> [T, n] float32.

        int8 and fp16 rows are widened to float one cache-sized chunk at a time, each chunk
        multiplied while it is still in cache: decoding all of a re-rank's ~5,000 rows first
        (a 5 MB float block) and then running one GEMM over it reads that block from memory
        twice and cost ~1.7x as much on a 1M-image index (BENCHMARKS.md, "re-rank scoring").
        int8 scales the [T, n] result by the per-row scales instead of scaling the rows.
        """
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        n = codes.shape[0]
        if self.form == "fp32":
            return query @ torch.from_numpy(codes).view(torch.float32).T
        if self.form not in ("int8", "fp16"):
            return query @ torch.from_numpy(self.decode(codes)).T
        raw = torch.from_numpy(codes)
        rows = raw[:, : self.dim].view(torch.int8) if self.form == "int8" else raw.view(torch.float16)
        out = torch.empty(query.shape[0], n)
        buf = self._scratch(min(n, SCORE_CHUNK))
        for a in range(0, n, SCORE_CHUNK):
            b = min(n, a + SCORE_CHUNK)
            chunk = buf[: b - a]
            chunk.copy_(rows[a:b])
            torch.mm(query, chunk.T, out=out[:, a:b])
        if self.form == "int8":
            out.mul_(raw[:, self.dim:].contiguous().view(torch.float16).reshape(-1).float())
        return out

    def _scratch(self, n: int) -> torch.Tensor:
        """A per-thread float buffer for decoded rows: a fresh array per query costs more in
        page faults than the conversion itself."""
        local = self.__dict__.setdefault("_local", threading.local())
        buf = getattr(local, "buf", None)
        if buf is None or buf.shape[0] < n:
            buf = local.buf = torch.empty(n, self.dim)
        return buf[:n]

    # persistence: FAISS's own serialisation (not pickle) for trained codecs
    def to_bytes(self) -> bytes | None:
        if self._index is None:
            return None
        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, form: str, dim: int, data: bytes | None) -> "TokenCodec":
        if data is None:
            return cls(form, dim)
        return cls(form, dim, faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))

    def save(self, path: Path) -> bool:
        data = self.to_bytes()
        if data is None:
            return False
        path.write_bytes(data)
        return True

    @classmethod
    def load(cls, form: str, dim: int, path: Path | None) -> "TokenCodec":
        if path is not None and path.is_file():
            return cls.from_bytes(form, dim, path.read_bytes())
        return cls(form, dim)


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length (zero rows stay zero) and their lengths [n, 1]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12), norm


# ------------------------------------------------------------------ build-time raw files
@dataclass
class RawKind:
    """Append-only files for one kind while a build runs (truncated back on resume)."""

    rows: Path
    glob: Path
    meta: Path  # int64 triples: id, offset, length

    @classmethod
    def at(cls, folder: Path, kind: str) -> "RawKind":
        return cls(folder / f"{kind}.rows.bin", folder / f"{kind}.global.f32", folder / f"{kind}.items.i64")

    def sizes(self) -> dict[str, int]:
        return {name: (p.stat().st_size if p.exists() else 0) for name, p in self._files()}

    def _files(self):
        return (("rows", self.rows), ("glob", self.glob), ("meta", self.meta))

    def truncate(self, sizes: dict[str, int]) -> None:
        for name, p in self._files():
            with open(p, "ab") as f:
                f.truncate(int(sizes.get(name, 0)))

    def append(self, rows: np.ndarray, glob: np.ndarray, ids: np.ndarray, lengths: np.ndarray,
               row_bytes: int) -> None:
        start = self.rows.stat().st_size // row_bytes if self.rows.exists() else 0
        offsets = start + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0)
        with open(self.rows, "ab") as f:
            f.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
        with open(self.glob, "ab") as f:
            f.write(np.ascontiguousarray(glob, dtype=np.float32).tobytes())
        triples = np.stack([ids, offsets, lengths], axis=1).astype(np.int64) if len(ids) else np.zeros((0, 3), np.int64)
        with open(self.meta, "ab") as f:
            f.write(triples.tobytes())

    def remove(self) -> None:
        for _, p in self._files():
            p.unlink(missing_ok=True)


def _copy_rows(dst: h5py.Dataset, src: Path, n: int, width: int, dtype, step_bytes: int = 64 << 20) -> None:
    if n == 0:
        return
    # plain reads, not a memmap: a memmap's touched pages count as resident for the whole copy
    step = max(1, step_bytes // (width * np.dtype(dtype).itemsize))
    with open(src, "rb") as fh:
        for s in range(0, n, step):
            k = min(step, n - s)
            dst[s:s + k] = np.fromfile(fh, dtype=dtype, count=k * width).reshape(k, width)


def write_segment(path: Path, raws: dict[str, RawKind], form: str, dim: int, row_bytes: int,
                  global_dim: int | None = None) -> dict[str, int]:
    """Turn the raw build files into one HDF5 segment with contiguous datasets; returns counts.
    `dim`: the token vectors'; `global_dim`: the global vectors' (default: the same)."""
    counts = {}
    gdim = global_dim or dim
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs.update({"form": form, "dim": dim, "row_bytes": row_bytes, "layout": "contiguous-uint8-rows"})
        for kind in KINDS:
            raw = raws[kind]
            sizes = raw.sizes()
            n_rows = sizes["rows"] // row_bytes
            n_items = sizes["meta"] // 24
            g = f.create_group(kind)
            # contiguous (no chunks, no filters): what makes the memmap gather possible
            rows = g.create_dataset("rows", shape=(n_rows, row_bytes), dtype=np.uint8)
            _copy_rows(rows, raw.rows, n_rows, row_bytes, np.uint8)
            glob = g.create_dataset("global", shape=(n_items, gdim), dtype=np.float32)
            _copy_rows(glob, raw.glob, n_items, gdim, np.float32)
            triples = (np.fromfile(raw.meta, dtype=np.int64).reshape(-1, 3) if n_items
                       else np.zeros((0, 3), np.int64))
            g.create_dataset("ids", data=triples[:, 0])
            g.create_dataset("offsets", data=triples[:, 1])
            g.create_dataset("lengths", data=triples[:, 2].astype(np.int32))
            counts[kind] = n_items
            counts[f"{kind}_rows"] = n_rows
    return counts


# ------------------------------------------------------------------ read side
def _memmap(path: Path, dset: h5py.Dataset, dtype) -> np.ndarray:
    shape = dset.shape
    if shape[0] == 0:
        return np.zeros(shape, dtype=dtype)
    off = dset.id.get_offset()
    if off is None or dset.chunks is not None or dset.compression is not None:
        return dset[...]  # not contiguous (foreign file): fall back to loading it
    return np.memmap(path, dtype=dtype, mode="r", offset=off, shape=shape)


class Segment:
    """One HDF5 segment opened for reading: memmaps over its contiguous datasets."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.kinds: dict[str, dict[str, np.ndarray]] = {}
        with h5py.File(self.path, "r") as f:
            self.form, self.dim, self.row_bytes = str(f.attrs["form"]), int(f.attrs["dim"]), int(f.attrs["row_bytes"])
            for kind in KINDS:
                g = f[kind]
                self.kinds[kind] = {
                    "rows": _memmap(self.path, g["rows"], np.uint8),
                    "global": _memmap(self.path, g["global"], np.float32),
                    "ids": g["ids"][...], "offsets": g["offsets"][...], "lengths": g["lengths"][...],
                }

    def nbytes(self, kind: str) -> int:
        return int(self.kinds[kind]["rows"].shape[0]) * self.row_bytes


def gather_rows(rows: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the row blocks [offset, offset+length) of several items -> (codes, lengths)."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    starts = np.repeat(offsets.astype(np.int64) - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    idx = starts + np.arange(total)
    return rows[idx], lengths


def pad_blocks(flat: np.ndarray, lengths: np.ndarray, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[sum(lengths), D] -> ([K, S, D] zero-padded, mask [K, S])."""
    K = len(lengths)
    S = int(max_len or (lengths.max() if K else 0))
    D = flat.shape[1]
    out = np.zeros((K, S, D), dtype=np.float32)
    mask = np.arange(S)[None, :] < lengths[:, None]
    out[mask] = flat
    return out, mask
