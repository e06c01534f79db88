"""Re-rank depth for a latency budget (`candidates: "auto"`).

Re-rank time is close to `t(K) = a + b*K` (fixed gather/launch cost plus a per-candidate
cost). We keep an EWMA of the *observed per-candidate* cost `c = t(K)/K` from every re-rank the
service runs, and pick `K = budget / c`. That iteration's fixed point is exactly the K with
`a + b*K = budget`, so it converges to the largest K that fits without having to fit `a` and
`b` separately, and it follows load changes (another process taking the CPU) within a few
requests.
"""
from __future__ import annotations

import math
import threading


class AutoDepth:
    def __init__(self, budget_s: float, min_k: int, max_k: int, alpha: float = 0.2,
                 initial_cost_s: float | None = None, default_k: int = 100):
        self.budget_s = budget_s
        self.min_k = min_k
        self.max_k = max_k
        self.alpha = alpha
        self.default_k = default_k
        self._cost: float | None = initial_cost_s if initial_cost_s and initial_cost_s > 0 else None
        self._lock = threading.Lock()
        self.samples = 0

    @property
    def per_candidate_s(self) -> float | None:
        return self._cost

    def observe(self, candidates: int, rerank_s: float) -> None:
        """Record one measured re-rank of `candidates` items that took `rerank_s` seconds."""
        if candidates <= 0 or not (rerank_s >= 0) or math.isinf(rerank_s):
            return
        c = rerank_s / candidates
        with self._lock:
            self._cost = c if self._cost is None else (1 - self.alpha) * self._cost + self.alpha * c
            self.samples += 1

    def pick(self, k: int) -> int:
        """Largest depth whose estimated re-rank cost fits the budget, within [max(k, min_k), max_k]."""
        lo = min(max(k, self.min_k), self.max_k)
        cost = self._cost
        if cost is None or cost <= 0:
            return max(lo, min(self.default_k, self.max_k))
        return int(max(lo, min(self.max_k, math.floor(self.budget_s / cost))))
