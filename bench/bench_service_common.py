"""Helpers shared by the service benchmarks: a served index on a loopback port, RSS (and the
common BENCHMARKS.md writer). Not a benchmark itself."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import BENCHMARKS, machine, write_section  # noqa: F401  (re-exported)
from common import ROOT as REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a `--workers` supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return out


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Summed over the process and its children (workers). VmRSS counts the memory-mapped token
    store's pages as they are touched (page cache, given back under pressure; shared pages count
    once per worker); RssAnon is the processes' own heap: the figure a leak would grow."""
    total, seen = 0.0, False
    for p in _tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(field + ":"):
                total += int(line.split()[1]) / 1024.0
                seen = True
    return total if seen else float("nan")


class Served:
    """`service --index DIR` in a subprocess on 127.0.0.1 (the way a user runs it)."""

    def __init__(self, index_dir: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "SERVICE_LOG_LEVEL": "warning", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--index", str(index_dir),
                                      "--host", "127.0.0.1", "--port", str(self.port)], cwd=REPO, env=full_env,
                                     stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 600) -> dict:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.proc.stderr.read()[-2000:]}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("service did not become ready")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tiny_index(folder: Path, n_images: int = 24, seed: int = 0) -> Path:
    """A small real index (random tiny backbones, dim 32, 4x4 grid) built by the indexer."""
    import numpy as np
    import torch
    from PIL import Image

    from encoder.config import BackboneConfig, HeadConfig, ModelConfig
    from encoder.model import TGDTModel
    from indexer.build import build
    from indexer.config import BuildConfig

    out = folder / "index"
    if (out / "manifest.json").is_file():
        return out
    torch.manual_seed(seed)
    head = HeadConfig(token_layers=1, global_layers=1, heads=2, global_mlp_hidden=64)
    cfg = ModelConfig(image_backbone=BackboneConfig(kind="tiny-image", dim=32),
                      text_backbone=BackboneConfig(kind="tiny-text", dim=32, max_tokens=16), embed_dim=32,
                      image_head=head, text_head=head)
    ckpt = TGDTModel(cfg, image_dim=32, text_dim=32, image_grid=(4, 4)).eval().save_pretrained(folder / "ckpt")
    col = folder / "col"
    (col / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "dog", "cat", "ball", "beach", "snow", "man", "child", "runs"]
    with (col / "pairs.jsonl").open("w") as f:
        for i in range(n_images):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(col / "images" / f"{i}.jpg")
            f.write(json.dumps({"image": f"images/{i}.jpg", "captions": [" ".join(rng.choice(words, 4))],
                                "split": ["train", "test"][i % 2], "n": i}) + "\n")
    build(BuildConfig(images=str(col), captions=str(col / "pairs.jsonl"), out=str(out), checkpoint=str(ckpt),
                      progress=False, faiss="flat"))
    return out
