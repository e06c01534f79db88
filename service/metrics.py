"""Prometheus metrics: requests, errors, request latency, and latency per search stage.

One registry per app (not the process-global default) so that several apps in one process
(tests, a hot-swap rehearsal) never collide on metric names. Under `service --workers N` the
values live in prometheus_client's multiprocess files and /metrics sums every worker's.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Fine buckets at the low end: the targets are 15 ms p50 / 40 ms p99.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = ("encode", "faiss", "rerank", "total")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # set by service.workers
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("service_requests_total", "HTTP requests", ["route", "method", "status"], registry=r)
        self.errors = Counter("service_errors_total", "HTTP responses with status >= 400",
                              ["route", "status"], registry=r)
        self.latency = Histogram("service_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("service_stage_seconds", "search latency per stage (encode, faiss, rerank, total)",
                               ["endpoint", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram("service_rerank_candidates", "re-rank depth K used",
                                    buckets=(1, 10, 25, 50, 100, 200, 400, 800, 1600, 5000, 10000), registry=r)
        self.auto_cost = Gauge("service_rerank_cost_per_candidate_seconds",
                               "EWMA of the measured re-rank cost per candidate (drives candidates='auto')",
                               multiprocess_mode="liveall", registry=r)
        self.generation = Gauge("service_index_generation", "index generation being served (per worker)",
                                multiprocess_mode="liveall", registry=r)
        self.items = Gauge("service_index_images", "images in the served index", multiprocess_mode="livemax",
                           registry=r)
        self.verified = Gauge("service_index_verified", "1: every checksum of the served index matched; "
                              "0: pending, off or no manifest; -1: a file failed (the index is not served)",
                              multiprocess_mode="liveall", registry=r)
        self.swaps = Counter("service_index_swaps_total", "index loads/swaps", ["result"], registry=r)
        self.in_flight = Gauge("service_requests_in_flight", "requests being handled", multiprocess_mode="livesum",
                               registry=r)

    def observe_stages(self, endpoint: str, timings_s: dict[str, float]) -> None:
        for stage in STAGES:
            v = timings_s.get(stage)
            if v is not None and v >= 0:
                self.stage.labels(endpoint, stage).observe(v)

    def render(self) -> bytes:
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)
