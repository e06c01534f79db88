"""The serving engine: one loaded Searcher behind an atomically swappable handle.

Why a handle: a request reads `engine.handle` once and uses that object for everything it
does, so a hot swap (admin call or SIGHUP) that replaces the reference mid-flight can neither
fail nor mix two indexes in one answer; the old Searcher is freed when its last request ends.
The new index is loaded and warmed on a separate thread *before* the swap, so the first
request after it pays no lazy-initialisation cost. Its files are checked against the manifest's
checksums first (`service.integrity`): a swap to an index that fails is refused, and an index
whose background check fails stops being served (503) rather than answering from damaged data.

Why an executor: encoding and FAISS are blocking CPU/GPU calls; running them on the event
loop would serialise every concurrent request. A bounded pool keeps them off the loop and
caps how many run at once; the requests inside it that reach the text encoder together are
encoded in one pass (`batching.CoalescingEncoder`).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import faiss
import torch

from encoder.model import checkpoint_digest
from encoder.pipeline import Encoder
from indexer.manifest import IndexFormatError, read_manifest
from indexer.searcher import Searcher

from .autodepth import AutoDepth
from .batching import CoalescingEncoder
from .contract import SearchBackend
from .integrity import FAILED, OK, PENDING, UNCHECKED, Verification
from .metrics import Metrics
from .settings import ServiceSettings

log = logging.getLogger("service.engine")
T = TypeVar("T")
Loader = Callable[[Path], SearchBackend]


class NotReady(RuntimeError):
    """No index is loaded (yet, or its load failed)."""


class IndexLoadError(RuntimeError):
    """A new index could not be loaded; the one being served (if any) stays."""


@dataclass(frozen=True)
class IndexHandle:
    searcher: SearchBackend
    generation: int
    index_dir: Path
    load_seconds: float
    verification: Verification = field(default_factory=lambda: Verification(UNCHECKED))


def default_loader(settings: ServiceSettings) -> Loader:
    """Open an index's `Searcher` (with `settings.checkpoint`: that model, refused unless it is
    the one the index was built with), its text runtime set and concurrent queries coalesced."""

    def load(index_dir: Path) -> Searcher:
        encoder = None
        if settings.checkpoint is not None:  # the same model, found elsewhere: never another one
            encoder = Encoder.from_pretrained(settings.checkpoint, device=settings.device)
            built_with = read_manifest(index_dir).checkpoint_digest
            if checkpoint_digest(settings.checkpoint) != built_with:
                raise IndexFormatError(f"--checkpoint {settings.checkpoint} is not the model {index_dir} was built "
                                       f"with (checkpoint {built_with[:12]}); rebuild the index with it")
        searcher = Searcher(index_dir, encoder=encoder, device=settings.device)
        runtime = searcher.encoder.set_text_runtime(settings.text_runtime, threads=settings.torch_threads)
        log.info("text queries encoded with %s, up to %d per pass", runtime, settings.encode_batch)
        if settings.encode_batch > 1:
            searcher.encoder = CoalescingEncoder(searcher.encoder, settings.encode_batch)
        return searcher

    return load


def warm_up(searcher: SearchBackend) -> None:
    """One tiny query through every stage, so lazy initialisation happens before the swap."""
    searcher.search_text("warm up", k=1, candidates=min(10, searcher.info.get("images") or 10), mode="rerank")


class Engine:
    def __init__(self, settings: ServiceSettings, loader: Loader | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.loader = loader or default_loader(settings)
        self.metrics = metrics or Metrics()
        self.executor = ThreadPoolExecutor(settings.search_threads, thread_name_prefix="search")
        self._load_executor = ThreadPoolExecutor(1, thread_name_prefix="index-load")
        self._handle: IndexHandle | None = None
        self._generation = 0
        self._swap_lock: asyncio.Lock | None = None
        self.load_error: str | None = None
        self.loading = False
        self.auto = AutoDepth(settings.rerank_budget_ms / 1000.0, settings.auto_min_candidates,
                              settings.max_candidates, default_k=settings.default_candidates)
        _set_threads(settings)

    # --- the handle -------------------------------------------------------------------------
    @property
    def handle(self) -> IndexHandle:
        h = self._handle
        if h is None:
            if self.loading:
                raise NotReady("the index is still loading")
            raise NotReady(f"no index loaded: {self.load_error}" if self.load_error else "no index loaded")
        if h.verification.state == FAILED:
            raise NotReady(f"the index failed verification: {'; '.join(h.verification.problems)}")
        return h

    @property
    def served(self) -> IndexHandle | None:
        """The installed handle, whatever its verification says (for /readyz)."""
        return self._handle

    @property
    def ready(self) -> bool:
        return self._handle is not None

    def install(self, searcher: SearchBackend, index_dir: Path, load_seconds: float = 0.0,
                initial_cost: float | None = None, verification: Verification | None = None) -> IndexHandle:
        """Make `searcher` the one being served (a single reference assignment: atomic), then
        hash its files still pending verification in the background."""
        self._generation += 1
        verification = verification or Verification(UNCHECKED)
        handle = IndexHandle(searcher, self._generation, Path(index_dir), load_seconds, verification)
        old = self._handle
        cost = initial_cost if initial_cost is not None else searcher.rerank_cost()
        if cost > 0 and self.auto.per_candidate_s is None:
            self.auto.observe(1, cost)
        self._handle = handle
        if old is not None:
            old.verification.stop()
        self.load_error = None
        self.metrics.generation.set(handle.generation)
        self._report_verification(handle)
        verification.start(f"index generation {handle.generation}",
                           on_done=lambda v: self._report_verification(handle))
        if isinstance(searcher.info.get("images"), int):
            self.metrics.items.set(searcher.info["images"])
        log.info("serving index %s (generation %d, loaded in %.2fs, verified: %s)", index_dir, handle.generation,
                 load_seconds, verification.state)
        return handle

    def _report_verification(self, handle: IndexHandle) -> None:
        if handle is self._handle:
            state = handle.verification.state
            self.metrics.verified.set({OK: 1, FAILED: -1}.get(state, 0))
            if state == PENDING:
                log.info("index generation %d: hashing %d token segment(s) in the background", handle.generation,
                         len(handle.verification.pending))

    async def load(self, index_dir: Path | str | None = None) -> IndexHandle:
        """Load (and warm) an index off the loop, then swap it in. Loads are serialised."""
        target = Path(index_dir) if index_dir is not None else self.settings.index_dir
        if target is None:
            raise IndexLoadError("no index directory configured (--index / SERVICE_INDEX_DIR)")
        if self._swap_lock is None:
            self._swap_lock = asyncio.Lock()
        async with self._swap_lock:
            self.loading = True
            swap = self._handle is not None  # a swap checks every file before it; a first load the small ones
            t0 = time.perf_counter()
            try:
                searcher, cost, verification = await asyncio.get_running_loop().run_in_executor(
                    self._load_executor, functools.partial(self._load_and_warm, target, swap))
            except Exception as e:
                reason = _one_line(e)
                if self._handle is None:
                    self.load_error = reason
                self.metrics.swaps.labels("failed").inc()
                log.error("index load failed for %s: %s", target, reason)
                raise IndexLoadError(f"cannot load index {target}: {reason}") from None
            finally:
                self.loading = False
            self.metrics.swaps.labels("ok").inc()
            return self.install(searcher, target, time.perf_counter() - t0, cost, verification)

    def _load_and_warm(self, index_dir: Path, swap: bool = False) -> tuple[SearchBackend, float, Verification]:
        """Runs on the loader thread: verify, open, warm, and measure the re-rank cost before the swap."""
        if not Path(index_dir).is_dir():
            raise FileNotFoundError(f"not a directory: {index_dir}")
        folder = Path(index_dir).resolve()
        verification = Verification.before_load(folder, self.settings.verify, swap=swap)
        searcher = self.loader(folder)
        warm_up(searcher)
        return searcher, searcher.rerank_cost(), verification

    # --- running blocking work off the loop ---------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._load_executor.shutdown(wait=False, cancel_futures=True)


def _set_threads(settings: ServiceSettings) -> None:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.faiss_threads:
        faiss.omp_set_num_threads(settings.faiss_threads)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
