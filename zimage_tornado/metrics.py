"""Prometheus metrics for GET /metrics, on a registry of the app's own (not the global one).

Request and upstream-call metrics are recorded as they happen; the engine's state (waiters,
polling loops, cache hits, ...) is read when Prometheus scrapes, from the objects that own it.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from zimage_tornado import __version__
from zimage_tornado.idempotency import IdempotencyStore
from zimage_tornado.watcher import TaskWatcher

# Long-polls last up to minutes: the buckets reach past the default five-minute wait.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
METHODS = frozenset({"GET", "POST", "OPTIONS", "HEAD", "PUT", "DELETE", "PATCH"})
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("zimage_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("zimage_http_request_duration_seconds", "Time to answer a request, by route",
                                 ["route"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.upstream_calls = Counter("zimage_upstream_calls", "Calls to the Z-Image service, by kind and outcome",
                                      ["kind", "outcome"], registry=self.registry)
        self.upstream_latency = Histogram("zimage_upstream_call_duration_seconds",
                                          "Duration of calls to the Z-Image service, by kind", ["kind"],
                                          buckets=UPSTREAM_BUCKETS, registry=self.registry)
        # key: a name from the keys file or "anonymous", never client text; reason: a fixed set
        self.submits = Counter("zimage_submits", "Tasks submitted upstream, by key", ["key"], registry=self.registry)
        self.images = Counter("zimage_images", "Images asked for by submitted tasks, by key", ["key"],
                              registry=self.registry)
        self.refused = Counter("zimage_refused", "Submits and waits refused by a caller's limits, by key and reason",
                               ["key", "reason"], registry=self.registry)
        self._children: dict[tuple[str, str, object], tuple[Any, Any]] = {}  # bounded: routes x methods x statuses

    def watch(self, watcher: TaskWatcher, idempotency: IdempotencyStore) -> None:
        """Report the engine's state, read from its owners at every scrape."""
        self.registry.register(_EngineCollector(watcher, idempotency))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # Label values from fixed sets only: a client chooses its method, and each new value
        # would be a new series kept for ever.
        method = method if method in METHODS else "other"
        self._observe((route, method, status), self.requests, (route, method, str(status)),
                      self.latency, (route,), seconds)

    def observe_submit(self, key: str, images: int) -> None:
        self.submits.labels(key).inc()
        self.images.labels(key).inc(images)

    def observe_refusal(self, key: str, reason: str) -> None:
        self.refused.labels(key, reason).inc()

    def observe_upstream(self, kind: str, outcome: str, seconds: float) -> None:
        self._observe(("upstream", kind, outcome), self.upstream_calls, (kind, outcome),
                      self.upstream_latency, (kind,), seconds)

    def _observe(self, key: tuple[str, str, object], counter: Counter, counter_labels: tuple[str, ...],
                 histogram: Histogram, histogram_labels: tuple[str, ...], seconds: float) -> None:
        children = self._children.get(key)
        if children is None:  # labels() is a locked lookup: do it once per label set
            children = self._children[key] = (counter.labels(*counter_labels), histogram.labels(*histogram_labels))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, watcher: TaskWatcher, idempotency: IdempotencyStore) -> None:
        self.watcher = watcher
        self.idempotency = idempotency

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        watcher = self.watcher
        counters = watcher.counters
        info = GaugeMetricFamily("zimage_info", "The gateway's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("zimage_waiters", "Clients waiting on tasks now", value=watcher.waiting)
        yield GaugeMetricFamily("zimage_polling_loops", "Tasks being polled now", value=watcher.active_polls)
        yield GaugeMetricFamily("zimage_cached_tasks", "Finished tasks remembered", value=len(watcher.cache))
        for name, key, text in (
            ("zimage_coalesced_waiters", "coalesced_waiters", "Waiters that joined a task's running polling loop"),
            ("zimage_coalesced_reads", "coalesced_reads", "Status reads that shared another caller's upstream read"),
            ("zimage_cache_hits", "cache_hits", "Answers served from the finished-task cache"),
            ("zimage_poll_errors", "upstream_errors", "Failed status reads while polling (retried)"),
            ("zimage_waiters_refused", "waiters_refused", "Waiters refused with 503 past max_waiters"),
            ("zimage_polling_loops_started", "polls_started", "Polling loops started"),
        ):
            yield CounterMetricFamily(name, text, value=counters[key])
        yield CounterMetricFamily("zimage_idempotent_replays", "Submits answered with an earlier task by key",
                                  value=self.idempotency.replays)
