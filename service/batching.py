"""Coalescing of concurrent single-query text encodes into one forward pass.

On CPU a short query's encode is bound by reading the transformer's weights, not by its few
tokens: eight queries in one pass cost about twice one query, not eight times. When requests
overlap, whoever finds the encoder idle becomes the leader and encodes everything waiting
(its own query included) in one batch; the others sleep until their rows are ready. A lone
request never waits for company (no timer), so latency at concurrency 1 is unchanged. No
background thread: nothing outlives a Searcher dropped by a hot swap.
"""
from __future__ import annotations

import threading
from typing import Any

_UNSET = object()


class _Slot:
    __slots__ = ("text", "value", "error")

    def __init__(self, text: str):
        self.text, self.value, self.error = text, _UNSET, None

    @property
    def done(self) -> bool:
        return self.value is not _UNSET or self.error is not None

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


class CoalescingEncoder:
    """Wraps an `Encoder`; only single-text `encode_texts` calls are coalesced."""

    def __init__(self, encoder: Any, max_batch: int = 16):
        self.inner = encoder
        self.max_batch = max(1, int(max_batch))
        self._cv = threading.Condition()
        self._pending: list[_Slot] = []
        self._busy = False
        self.batches = 0  # passes run, and texts in them: how much coalescing happened
        self.texts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode_texts(self, texts: list[str]):
        if len(texts) != 1 or self.max_batch == 1:
            return self.inner.encode_texts(texts)
        slot = _Slot(texts[0])
        with self._cv:
            self._pending.append(slot)
        while True:
            with self._cv:
                while not slot.done and self._busy:
                    self._cv.wait()
                if slot.done:
                    return slot.result()
                self._busy = True
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _run(self, batch: list[_Slot]) -> None:
        try:
            emb = self.inner.encode_texts([s.text for s in batch])
        except BaseException as e:  # every waiter gets the failure, none hangs
            for s in batch:
                s.error = e
            return
        self.batches += 1
        self.texts += len(batch)
        for i, s in enumerate(batch):
            real = emb.mask[i].nonzero()  # trim the batch's padding (after the last kept word:
            n = int(real.max()) + 1 if len(real) else 1  # the word mask can drop words inside)
            s.value = type(emb)(emb.global_[i: i + 1], emb.tokens[i: i + 1, :n].contiguous(),
                                emb.mask[i: i + 1, :n].contiguous(),
                                None if emb.domain is None else emb.domain[i: i + 1])

