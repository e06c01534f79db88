"""A test double of `service.contract.SearchBackend`: an in-memory collection, for tests and API fuzzing.

Why it exists: the HTTP layer's edges (limits, errors, hot swap, auth, the web page) must be
testable in milliseconds and without a model; the real-index tests cover the real engine.
Scores are deterministic functions of the words, so tests can assert rankings.
"""
from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoder.confidence import confidence
from indexer.results import Hit, SearchError, SearchResult  # the contract's result types (service.contract)


def _vec(word: str, dim: int) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeSearcher:
    """`n_images` images (solid-colour JPEGs written to `root`), two captions each."""

    def __init__(self, root: Path, n_images: int = 8, dim: int = 16, grid: tuple[int, int] = (4, 4), tag: str = "a",
                 delay_s: float = 0.0, calibration: tuple[float, float] | None = (8.0, -2.0)):
        from PIL import Image

        self.root = Path(root)
        self.calibration = calibration  # Platt (a, b) of every caption-image score (None: no confidence)
        self.tag = tag
        self.delay_s = delay_s
        self.dim = dim
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        colours = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
        animals = ["dog", "cat", "horse", "bird"]
        self.captions: list[str] = []
        self.caption_image: list[int] = []
        self.meta: list[dict] = []
        self.paths: list[Path] = []
        cells = grid[0] * grid[1]
        self.tokens = np.zeros((n_images, cells, dim), np.float32)
        for i in range(n_images):
            c, a = colours[i % len(colours)], animals[i % len(animals)]
            p = self.root / "images" / f"{tag}{i}.jpg"
            rgb = [60 + (i * 53) % 190, 60 + (i * 97) % 190, 60 + (i * 151) % 190]
            Image.new("RGB", (32 + i, 32), tuple(rgb)).save(p)
            self.paths.append(p)
            self.meta.append({"split": "test" if i % 2 == 0 else "train", "n": i, "tag": tag})
            for cap in (f"a {c} {a} on grass", f"the {a} is {c}"):
                self.captions.append(cap)
                self.caption_image.append(i)
            # cell (i % cells) holds the colour, the next one the animal: grounding is checkable
            rng = np.random.default_rng(1000 + i)
            self.tokens[i] = rng.standard_normal((cells, dim)).astype(np.float32) * 0.1
            self.tokens[i, i % cells] += _vec(c, dim)
            self.tokens[i, (i + 1) % cells] += _vec(a, dim)
        self.tokens /= np.linalg.norm(self.tokens, axis=-1, keepdims=True)
        g = self.tokens.mean(1)
        self.globals = g / np.linalg.norm(g, axis=-1, keepdims=True)
        self.n_images = n_images
        self.grid = grid
        self.info = {"images": n_images, "captions": len(self.captions), "tag": tag, "fake": True}
        self.metadata_fields = {"split", "n", "tag"}

    # --- contract ------------------------------------------------------------------------------
    def _words(self, query: str) -> tuple[list[str], np.ndarray]:
        words = query.lower().split()[:16] or [""]
        return words, np.stack([_vec(w, self.dim) for w in words])

    def _allowed(self, filters: dict | None) -> np.ndarray:
        ok = np.ones(self.n_images, bool)
        for key, want in (filters or {}).items():
            if key not in self.metadata_fields:
                raise SearchError(f"unknown filter field {key!r}")
            wants = want if isinstance(want, list) else [want]
            ok &= np.array([m.get(key) in wants for m in self.meta])
        return ok

    def search_text(self, query: str, k: int = 10, candidates: int = 100, mode: str = "rerank",
                    filters: dict | None = None, explain: bool = False) -> SearchResult:
        t0 = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        words, wv = self._words(query)
        q = wv.mean(0)
        q /= np.linalg.norm(q) + 1e-9
        t1 = time.perf_counter()
        gs = self.globals @ q
        gs[~self._allowed(filters)] = -np.inf
        order = [int(i) for i in np.argsort(-gs) if np.isfinite(gs[i])]
        cand = order[: max(k, candidates)] if mode == "rerank" else order[:k]
        t2 = time.perf_counter()
        hits = []
        for i in cand:
            sim = np.einsum("td,sd->ts", wv, self.tokens[i])
            local = float(sim.max(1).mean())
            score = 0.5 * float(gs[i]) + 0.5 * local if mode == "rerank" else float(gs[i])
            align = None
            if explain:
                best = sim.argmax(1)
                align = [{"word": w, "content": True, "cell": int(b), "row": int(b) // self.grid[1],
                          "col": int(b) % self.grid[1], "score": float(sim[j, b])}
                         for j, (w, b) in enumerate(zip(words, best))]
            hits.append(Hit(i, score, float(gs[i]), local if mode == "rerank" else None, "image",
                                dict(self.meta[i]), self.rel(i), None, i, align, self.user_id(i)))
        hits.sort(key=lambda h: -h.score)
        self._confide(hits)
        t3 = time.perf_counter()
        return SearchResult(hits[:k], {"encode": t1 - t0, "faiss": t2 - t1, "rerank": t3 - t2, "total": t3 - t0},
                          len(cand) if mode == "rerank" else 0)

    def search_image(self, image: Any, k: int = 10, candidates: int = 100, mode: str = "rerank",
                     filters: dict | None = None, target: str = "captions", explain: bool = False) -> SearchResult:
        t0 = time.perf_counter()
        arr = np.asarray(image.convert("RGB").resize((4, 4)), np.float32).reshape(-1)
        rng = np.random.default_rng(int(arr.sum()) % 2**32)
        q = rng.standard_normal(self.dim).astype(np.float32)
        q /= np.linalg.norm(q)
        allowed = self._allowed(filters)
        if target == "images":
            s = self.globals @ q
            order = [int(i) for i in np.argsort(-s) if allowed[i]][:k]
            hits = [Hit(i, float(s[i]), float(s[i]), None, "image", dict(self.meta[i]), self.rel(i),
                            None, i, None, self.user_id(i)) for i in order]
        else:
            s = np.array([float(self.globals[self.caption_image[c]] @ q) + 0.001 * c
                          for c in range(len(self.captions))])
            order = [int(c) for c in np.argsort(-s) if allowed[self.caption_image[c]]][:k]
            hits = [Hit(10_000 + c, float(s[c]), float(s[c]), None, "caption",
                            dict(self.meta[self.caption_image[c]]), self.rel(self.caption_image[c]), self.captions[c],
                            self.caption_image[c], None, self.user_id(self.caption_image[c]))
                    for c in order]
            self._confide(hits)
        t = time.perf_counter() - t0
        return SearchResult(hits, {"encode": t / 2, "faiss": t / 2, "rerank": 0.0, "total": t},
                          min(candidates, len(hits)) if mode == "rerank" else 0)

    def _confide(self, hits: list[Hit]) -> None:
        """Each caption-image hit's confidence from its score, as the real searcher computes it."""
        conf = confidence(torch.tensor([h.score for h in hits], dtype=torch.float64), self.calibration)
        for j, h in enumerate(hits):
            h.confidence = None if conf is None else float(conf[j])

    def rel(self, i: int) -> str:
        """Image i's path as the index stores it: relative to the images folder (`root`)."""
        return self.paths[i].relative_to(self.root).as_posix()

    def user_id(self, i: int) -> str:
        return f"{self.tag}-{i}"

    def item(self, id: int) -> dict | None:
        if 0 <= id < self.n_images:
            return {"id": id, "kind": "image", "path": self.rel(id), "user_id": self.user_id(id),
                    "metadata": dict(self.meta[id]),
                    "captions": [c for c, i in zip(self.captions, self.caption_image) if i == id]}
        c = id - 10_000
        if 0 <= c < len(self.captions):
            i = self.caption_image[c]
            return {"id": id, "kind": "caption", "caption": self.captions[c], "image_id": i, "path": self.rel(i),
                    "user_id": self.user_id(i), "metadata": dict(self.meta[i])}
        return None

    def item_by_path(self, path: str) -> dict | None:
        return next((self.item(i) for i in range(self.n_images) if self.rel(i) == path), None)

    def item_by_user_id(self, user_id: str) -> dict | None:
        return next((self.item(i) for i in range(self.n_images) if self.user_id(i) == str(user_id)), None)

    def image_path(self, id: int) -> Path | None:
        return self.paths[id] if 0 <= id < self.n_images else None

    def rerank_cost(self) -> float:
        return 2e-5
