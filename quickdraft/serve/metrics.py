"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own so that
several servers (tests, Ray replicas) never share or clash over collectors."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
THROUGHPUT_WINDOW_S = 10.0


class Metrics:
    """The server's counters, gauges and histograms. Thread-safe (prometheus_client's
    collectors are); the scheduler thread and the asyncio side both write here."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("quickdraft_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("quickdraft_finished", "Generations by how they ended "
                                "(stop, length, cancelled, timeout, error)", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter("quickdraft_prompt_tokens", "Prompt tokens prefilled",
                                     registry=r)
        self.tokens = Counter("quickdraft_tokens_generated", "New tokens generated",
                              registry=r)
        self.drafted = Counter("quickdraft_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter("quickdraft_accepted_tokens", "Draft tokens accepted",
                                registry=r)
        self.acceptance_rate = Gauge("quickdraft_acceptance_rate", "Accepted over proposed "
                                     "draft tokens since start", registry=r)
        self.alpha = Gauge("quickdraft_alpha", "Empirical alpha (mean beta over the draft "
                           "positions reached) since start", registry=r)
        self.tokens_per_s = Gauge("quickdraft_tokens_per_second", "New tokens per second "
                                  f"over the last {THROUGHPUT_WINDOW_S:g} s, all streams",
                                  registry=r)
        self.queue_depth = Gauge("quickdraft_queue_depth", "Requests waiting for a stream",
                                 registry=r)
        self.active = Gauge("quickdraft_active_streams", "Streams being decoded", registry=r)
        self.generators = Gauge("quickdraft_generators_open", "Open Generators (active and "
                                "pooled)", registry=r)
        self.ttft = Histogram("quickdraft_time_to_first_token_seconds", "Arrival to the "
                              "first new token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("quickdraft_inter_token_latency_seconds", "Time between new "
                             "tokens of one stream (a step's time over its tokens)",
                             buckets=_ITL_BUCKETS, registry=r)
        self.latency = Histogram("quickdraft_request_latency_seconds", "Arrival to the last "
                                 "token", buckets=_LATENCY_BUCKETS, registry=r)
        self.lane_calls = Counter("quickdraft_lane_calls", "Target calls that verified two or "
                                  "more streams' proposals at once", registry=r)
        self.lane_streams = Histogram("quickdraft_lane_streams", "Streams verified per such "
                                      "call", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.draft_lane_calls = Counter("quickdraft_draft_lane_calls", "Draft chains that "
                                        "drafted two or more streams' proposals at once",
                                        registry=r)
        self._lock = threading.Lock()
        self._betas = [0.0, 0]  # sum, count
        self._counts = [0, 0]  # accepted, drafted
        self._recent: deque[tuple[float, int]] = deque()

    # -- written by the scheduler ----------------------------------------------------------

    def observe_tokens(self, n: int, now: float | None = None) -> None:
        if n <= 0:
            return
        self.tokens.inc(n)
        now = time.monotonic() if now is None else now
        with self._lock:
            self._recent.append((now, n))
        self.update_throughput(now)

    def update_throughput(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent.popleft()
            total = sum(n for _, n in self._recent)
        self.tokens_per_s.set(total / THROUGHPUT_WINDOW_S)

    def observe_generation(self, generation_stats) -> None:
        """Add one finished generation's draft counts and betas (speculative only)."""
        g = generation_stats
        accepted, drafted = sum(g.accepted_per_iteration), sum(g.drafted_per_iteration)
        if drafted:
            self.drafted.inc(drafted)
            self.accepted.inc(accepted)
        with self._lock:
            self._counts[0] += accepted
            self._counts[1] += drafted
            self._betas[0] += float(sum(g.beta_per_position))
            self._betas[1] += len(g.beta_per_position)
            if self._counts[1]:
                self.acceptance_rate.set(self._counts[0] / self._counts[1])
            if self._betas[1]:
                self.alpha.set(self._betas[0] / self._betas[1])

    def render(self) -> bytes:
        self.update_throughput()
        return generate_latest(self.registry)
