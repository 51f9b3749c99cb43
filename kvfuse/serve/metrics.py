"""Prometheus metrics of one engine, in a registry of its own (several servers may share a
process: tests, Ray replicas). Served at /metrics in the text exposition format."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# seconds: inter-token latencies of a CPU decode step lie between a few ms and a few hundred
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Queue length, active rows, tokens/s, TTFT and inter-token histograms, outcomes."""

    def __init__(self, slots: int) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        r = self.registry
        Gauge("kvfuse_slots", "Rows of the KV arena", registry=r).set(slots)
        self.queue = Gauge("kvfuse_queue_length", "Requests waiting for a row", registry=r)
        self.rows = Gauge("kvfuse_active_rows", "Rows holding a running request", registry=r)
        self.tokens = Counter("kvfuse_generated_tokens", "Tokens generated", registry=r)
        self.rate = Gauge(
            "kvfuse_decode_tokens_per_second", "Tokens decoded per second, last 5 s", registry=r
        )
        self.ttft = Histogram(
            "kvfuse_time_to_first_token_seconds",
            "Submission to first token, queue wait included",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kvfuse_inter_token_latency_seconds",
            "Time between two tokens of one request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("kvfuse_requests", "Requests by outcome", ["outcome"], registry=r)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._durations: collections.deque[float] = collections.deque(maxlen=32)
        self._lock = threading.Lock()

    def step(self, tokens: int, seconds: float) -> None:
        """A decode step produced `tokens` tokens."""
        self.tokens.inc(tokens)
        now = time.monotonic()
        with self._lock:
            self._window.append((now, tokens))
            while self._window and self._window[0][0] < now - 5.0:
                self._window.popleft()
            span = max(now - self._window[0][0] + seconds, 1e-6)
            self.rate.set(sum(count for _, count in self._window) / span)

    def outcome(self, outcome: str, duration_s: float | None = None) -> None:
        self.requests.labels(outcome).inc()
        if duration_s is not None:
            with self._lock:
                self._durations.append(duration_s)

    def typical_request_s(self) -> float:
        with self._lock:
            return sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
