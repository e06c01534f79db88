"""`indexer build --engine ray`: decode and encode a collection on a Ray cluster, then merge.

Pipeline (Ray Data, streaming):

    positions --(decode tasks, fractional CPUs)--> pixels --(encoder actor pool, CPUs or GPUs)--> shard .npz

Each encoder actor loads the checkpoint once and writes every batch it encodes as one shard
(`<out>.partial/shards/*.npz`, plain numpy arrays, never pickles). The driver then merges the
shards in input order through the single-machine builder's own writer and finalizer
(`indexer.build`), so the result is the same index format, with the same ids, rows, duplicate
handling and FAISS choice, as `indexer build` on one machine: the only thing Ray changes is
where the pixels are decoded and encoded.

Why these defaults: on a 2-core box, actors at `num_cpus=1` take every CPU and the decode tasks
can never be scheduled (the pipeline deadlocks); measured working there: `num_cpus=0.5` per actor
and `override_num_blocks=10` so decode work is split finely enough to interleave.
Multi-node: `<out>` must be on storage every node sees (NFS, a shared volume), since the actors
write the shards there; the images root likewise.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from encoder.backbones import build_image_backbone
from encoder.model import TGDTModel, checkpoint_digest

from . import metadata
from .build import (BuildError, _Builder, _Encoded, _Files, check_faiss_like,
                    codec_ready, finalize, open_encoder, partial_dir, publish,
                    report_inputs, require_images, source_of)
from .config import BuildConfig
from .inputs import Entry, Source
from .manifest import CODEC, META, read_manifest
from .tokenstore import KINDS, TokenCodec

SHARDS = "shards"


class RayConfig(BaseModel):
    """Where and how wide a Ray build runs (the CLI's --ray-* flags fill it)."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="existing cluster ('auto', 'ray://head:10001'); None starts a local one")
    local_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster started when address is None")
    encoders: int = Field(2, ge=1, description="encoder actors in the pool")
    encoder_cpus: float = Field(0.5, gt=0, description="CPUs per encoder actor (fractional: see module doc)")
    encoder_gpus: float | None = Field(None, ge=0, description="GPUs per encoder actor; None = 1 when the cluster has GPUs")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs per decode task")
    blocks: int = Field(10, ge=1, description="override_num_blocks of the input dataset")
    keep_shards: bool = Field(False, description="keep <out>/shards after the merge (debugging)")


# ------------------------------------------------------------------ cluster side
def _decode_batch(batch: dict[str, np.ndarray], root: str, paths: list[str], checkpoint: str | None) -> dict:
    """Read, hash, decode and preprocess a batch of positions (runs as a Ray task)."""
    pre = _preprocessor(checkpoint)
    files = _Files(Path(root), [Entry(p) for p in paths], 0, pre)
    pos_out, sha_out, reason_out, pixels = [], [], [], []
    shape = None
    items = [files[int(p)] for p in batch["pos"]]
    for _, _, px, _ in items:
        if px is not None:
            shape = tuple(px.shape)
            break
    for pos, sha, px, reason in items:
        pos_out.append(pos)
        sha_out.append(sha or "")
        reason_out.append(reason or "")
        pixels.append(px.numpy() if px is not None else None)
    if shape is None:  # every file in the batch failed: a 1-pixel placeholder keeps the column typed
        shape = (1, 1, 1)
    zero = np.zeros(shape, np.float32)
    return {"pos": np.array(pos_out, np.int64), "sha": np.array(sha_out, dtype="U64"),
            "reason": np.array(reason_out, dtype=str), "ok": np.array([p is not None for p in pixels]),
            "pixels": np.stack([p if p is not None else zero for p in pixels]).astype(np.float32)}


_PRE: dict[str | None, Any] = {}


def _preprocessor(checkpoint: str | None):
    """The checkpoint's image preprocessing, built once per worker process (no encoder weights needed
    for it, but the backbone object owns it, so we build the image backbone once and cache it)."""
    if checkpoint not in _PRE:
        cfg = TGDTModel.from_pretrained(checkpoint).config
        _PRE[checkpoint] = build_image_backbone(cfg.image_backbone).preprocess
    return _PRE[checkpoint]


class _EncodeActor:
    """One encoder per actor; every batch it encodes becomes one shard file."""

    def __init__(self, cfg_json: str, shard_dir: str, entries: list[tuple[str, list[str]]], device: str | None):
        cfg = BuildConfig.model_validate_json(cfg_json)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(1)  # fractional-CPU actors: do not oversubscribe the node
        encoder = open_encoder(cfg.checkpoint, device)
        source = Source(Path(cfg.images), [Entry(p, list(c)) for p, c in entries], [])
        self.builder = _Builder(cfg, source, encoder, Path(shard_dir))
        self.shard_dir = Path(shard_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        order = np.argsort(batch["pos"], kind="stable")
        items = []
        for i in order:
            ok = bool(batch["ok"][i])
            items.append((int(batch["pos"][i]), str(batch["sha"][i]) or None,
                          torch.from_numpy(np.ascontiguousarray(batch["pixels"][i])) if ok else None,
                          None if ok else str(batch["reason"][i])))
        enc = self.builder.encode(items)
        path = self.shard_dir / f"shard-{int(batch['pos'][order[0]]):09d}-{uuid.uuid4().hex[:8]}.npz"
        save_shard(path, enc)
        return {"shard": np.array([path.name]), "images": np.array([len(items)], np.int64)}


# ------------------------------------------------------------------ shard files
def save_shard(path: Path, b: _Encoded) -> None:
    """An encoded batch as plain arrays (np.load(..., allow_pickle=False) reads it back)."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp,
             ok_pos=np.array([p for p, _ in b.ok], np.int64), ok_sha=np.array([s for _, s in b.ok], dtype="U64"),
             bad_pos=np.array([p for p, _, _ in b.bad], np.int64),
             bad_sha=np.array([s or "" for _, s, _ in b.bad], dtype="U64"),
             bad_reason=np.array([r for _, _, r in b.bad], dtype=str),
             img_global=b.img_global, img_tokens=b.img_tokens, img_len=b.img_len,
             cap_ord=np.array([c for c, _, _ in b.cap_items], np.int64),
             cap_pos=np.array([p for _, p, _ in b.cap_items], np.int64),
             cap_global=b.cap_global, cap_tokens=b.cap_tokens, cap_len=b.cap_len)
    os.replace(tmp, path)


class _Shard:
    """One loaded shard, addressable per image position."""

    def __init__(self, path: Path, dim: int):
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        self.ok = {int(p): (i, str(s)) for i, (p, s) in enumerate(zip(a["ok_pos"], a["ok_sha"]))}
        self.bad = {int(p): (str(s) or None, str(r)) for p, s, r in zip(a["bad_pos"], a["bad_sha"], a["bad_reason"])}
        self.a, self.dim = a, dim
        self.img_off = np.concatenate([[0], np.cumsum(a["img_len"])]).astype(np.int64)
        self.cap_off = np.concatenate([[0], np.cumsum(a["cap_len"])]).astype(np.int64)
        self.caps_of: dict[int, list[int]] = {}
        for j, p in enumerate(a["cap_pos"]):
            self.caps_of.setdefault(int(p), []).append(j)
        self.positions = sorted([*self.ok, *self.bad])


def merge_batches(shard_paths: list[Path], entries, dim: int, batch_size: int,
                  token_dim: int | None = None) -> Iterator[_Encoded]:
    """Yield `_Encoded` batches in input order, rebuilt from shards (streaming: a shard is kept in
    memory only until every position it holds has been emitted)."""
    index: list[tuple[int, int]] = []  # (position, shard number)
    for s, path in enumerate(shard_paths):
        with np.load(path, allow_pickle=False) as z:
            index += [(int(p), s) for p in z["ok_pos"]] + [(int(p), s) for p in z["bad_pos"]]
    index.sort()
    positions = [p for p, _ in index]
    if len(set(positions)) != len(positions):
        raise BuildError("shards overlap: the same image was encoded twice (stale shards directory?)")
    remaining: dict[int, int] = {}
    for _, s in index:
        remaining[s] = remaining.get(s, 0) + 1
    loaded: dict[int, _Shard] = {}
    for start in range(0, len(index), batch_size):
        chunk = index[start:start + batch_size]
        out = _Encoded(end=chunk[-1][0] + 1)
        g, t, ln, cap_items, cg, ct, cl = [], [], [], [], [], [], []
        for pos, s in chunk:
            sh = loaded.get(s) or loaded.setdefault(s, _Shard(shard_paths[s], dim))
            if pos in sh.ok:
                i, sha = sh.ok[pos]
                out.ok.append((pos, sha))
                g.append(sh.a["img_global"][i])
                t.append(sh.a["img_tokens"][sh.img_off[i]:sh.img_off[i + 1]])
                ln.append(sh.a["img_len"][i])
                for k, j in enumerate(sh.caps_of.get(pos, [])):  # k-th caption of the image, as _Builder.encode
                    cap_items.append((int(sh.a["cap_ord"][j]), pos, entries[pos].captions[k]))
                    cg.append(sh.a["cap_global"][j])
                    ct.append(sh.a["cap_tokens"][sh.cap_off[j]:sh.cap_off[j + 1]])
                    cl.append(sh.a["cap_len"][j])
            else:
                sha, reason = sh.bad[pos]
                out.bad.append((pos, sha, reason))
            remaining[s] -= 1
            if remaining[s] == 0:
                del loaded[s]
        z2 = np.zeros((0, dim), np.float32)
        out.img_global = np.stack(g).astype(np.float32) if g else z2
        out.img_tokens = np.concatenate(t).astype(np.float32) if t else np.zeros((0, token_dim or dim), np.float32)
        out.img_len = np.array(ln, np.int64)
        out.cap_items = cap_items
        out.cap_global = np.stack(cg).astype(np.float32) if cg else z2
        out.cap_tokens = np.concatenate(ct).astype(np.float32) if ct else z2
        out.cap_len = np.array(cl, np.int64)
        yield out


# ------------------------------------------------------------------ driver
def _init_ray(rc: RayConfig):
    try:
        import ray
    except ImportError:
        raise BuildError("--engine ray needs Ray: pip install -e '.[cluster]'") from None
    if not ray.is_initialized():
        kw: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
        if rc.address:
            kw["address"] = rc.address
        else:
            kw["num_cpus"] = rc.local_cpus or os.cpu_count() or 1
            kw["include_dashboard"] = False
        try:
            ray.init(**kw)
        except ConnectionError as e:
            raise BuildError(f"cannot reach the Ray cluster at {rc.address}: {e}") from None
    return ray


def encode_shards(cfg: BuildConfig, rc: RayConfig, source, shard_dir: Path) -> dict:
    """Run the Ray Data pipeline; every encoded batch lands in `shard_dir`. Returns stats."""
    ray = _init_ray(rc)
    gpus = rc.encoder_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    device = cfg.device or ("cuda" if gpus > 0 else "cpu")
    shard_dir.mkdir(parents=True, exist_ok=True)
    paths = [e.path for e in source.entries]
    entries = [(e.path, list(e.captions)) for e in source.entries]
    ds = ray.data.from_items([{"pos": i} for i in range(len(paths))], override_num_blocks=rc.blocks)
    ds = ds.map_batches(_decode_batch, batch_size=cfg.batch_size, num_cpus=rc.decode_cpus,
                        fn_kwargs={"root": str(source.root), "paths": paths, "checkpoint": cfg.checkpoint})
    ds = ds.map_batches(_EncodeActor, batch_size=cfg.batch_size, concurrency=rc.encoders,
                        num_cpus=rc.encoder_cpus, num_gpus=gpus or None,
                        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "shard_dir": str(shard_dir),
                                               "entries": entries, "device": device})
    t0 = time.perf_counter()
    written = ds.take_all()
    return {"encode_seconds": time.perf_counter() - t0, "shards": len(written),
            "images": int(sum(r["images"] for r in written)), "device": device}


def ray_build(cfg: BuildConfig, rc: RayConfig | None = None, encoder=None) -> Any:
    """Build `cfg.out` on a Ray cluster; same index format (and answers) as `indexer.build.build`.

    Returns the manifest. `encoder` (optional) is the driver's encoder for the merge and
    finalize steps (no encoding happens there; it supplies dim, grid and model config).
    """
    rc = rc or RayConfig()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise BuildError(f"{out} already exists; pass --overwrite to replace it")
    source = source_of(cfg)
    digest = checkpoint_digest(cfg.checkpoint)
    part = partial_dir(out)
    if part.exists():
        shutil.rmtree(part)  # shards are cheap to redo; a stale mix would corrupt the merge
    part.mkdir(parents=True)
    encoder = encoder or open_encoder(cfg.checkpoint, "cpu")
    check_faiss_like(cfg, digest, encoder.dim)
    stats = encode_shards(cfg, rc, source, part / SHARDS)

    # merge: the single-machine writer, fed in input order
    con = metadata.connect(part / META)
    builder = _Builder(cfg, source, encoder, part)
    for kind in KINDS:
        builder.codecs[kind] = TokenCodec.load(cfg.tokens, encoder.token_dim, part / CODEC[kind])
    report_inputs(con, source)
    seen: dict[str, tuple[int, str]] = {}
    shard_paths = sorted((part / SHARDS).glob("shard-*.npz"))
    # same codec-training sample as encode_into (the first batches up to codec_train_tokens), then stream
    for b in codec_ready(builder, merge_batches(shard_paths, source.entries, encoder.dim, cfg.batch_size, encoder.token_dim), cfg, part):
        builder.write(con, b, seen)
    con.close()
    if not rc.keep_shards:
        shutil.rmtree(part / SHARDS)
    try:
        require_images(part / META, source)
    except BuildError:
        shutil.rmtree(part, ignore_errors=True)
        raise
    finalize(part, cfg, encoder, source.root, digest, {"encode_seconds": stats["encode_seconds"]})
    publish(part, out)
    return read_manifest(out)


def add_ray_arguments(parser) -> None:
    """The --ray-* flags of `indexer build` (the CLI adds `--engine {local,ray}` next to them)."""
    g = parser.add_argument_group("ray engine")
    g.add_argument("--ray-address", help="Ray cluster address ('auto', 'ray://head:10001'); default: start a local one")
    g.add_argument("--ray-encoders", type=int, default=2, help="encoder actors")
    g.add_argument("--ray-encoder-cpus", type=float, default=0.5, help="CPUs per encoder actor")
    g.add_argument("--ray-encoder-gpus", type=float, default=None, help="GPUs per encoder actor (default: 1 if any)")
    g.add_argument("--ray-blocks", type=int, default=10, help="input blocks (override_num_blocks)")


def ray_config_from_args(args) -> RayConfig:
    return RayConfig(address=args.ray_address, encoders=args.ray_encoders, encoder_cpus=args.ray_encoder_cpus,
                     encoder_gpus=args.ray_encoder_gpus, blocks=args.ray_blocks)
