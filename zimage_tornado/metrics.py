"""Prometheus metrics for GET /metrics, on a registry of the app's own (not the global one).

Request, upstream-call and usage metrics are recorded as they happen. The engine's counts and
state (waiters, polling loops, cache hits, ...) are owned by the engine; sync() carries them
into real counters and gauges: at every scrape in one process, and every second in each worker
with `--processes=N`, where prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
set up by cli.py before any metric exists) adds the workers up, so a scrape shows the whole
process group whichever worker answers it, and counters never go backwards.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from zimage_tornado import __version__
from zimage_tornado.idempotency import IdempotencyStore
from zimage_tornado.store import Store
from zimage_tornado.watcher import TaskWatcher

# Long-polls last up to minutes: the buckets reach past the default five-minute wait.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
METHODS = frozenset({"GET", "POST", "OPTIONS", "HEAD", "PUT", "DELETE", "PATCH"})
# (metric name, the engine's count it reports, help)
ENGINE_COUNTERS = (
    ("zimage_coalesced_waiters", "coalesced_waiters", "Waiters that joined a task's running polling loop"),
    ("zimage_coalesced_reads", "coalesced_reads", "Status reads that shared another caller's upstream read"),
    ("zimage_cache_hits", "cache_hits", "Answers served from the finished-task cache"),
    ("zimage_poll_errors", "upstream_errors", "Failed status reads while polling (retried)"),
    ("zimage_waiters_refused", "waiters_refused", "Waiters refused with 503 past max_waiters"),
    ("zimage_polling_loops_started", "polls_started", "Polling loops started"),
    ("zimage_idempotent_replays", "replays", "Submits answered with an earlier task by Idempotency-Key"),
    ("zimage_states_heard", "states_heard", "Task states published by another instance of the fleet and used here"),
    ("zimage_reads_left_to_others", "reads_left_to_others",
     "Polling ticks that left the upstream read to the instance holding the task's lease"),
    ("zimage_follow_expired", "follow_expired", "Followed tasks recorded as expired: not ended within follow_budget"),
    ("zimage_upstream_reads_paced", "reads_paced", "Status reads that waited for a turn in upstream_reads_per_second"),
    ("zimage_upstream_reads_deferred", "reads_deferred",
     "Background reads (of tasks nobody waits on) that gave way to reads someone waits for"),
    ("zimage_store_dropped", "store_dropped",
     "Store writes made after an answer and dropped because the retry queue was full"),
)
ENGINE_GAUGES = (
    ("zimage_waiters", "waiting", "Clients waiting on tasks now"),
    ("zimage_polling_loops", "polling", "Tasks being polled now"),
    ("zimage_cached_tasks", "cached", "Finished tasks remembered"),
    ("zimage_followed_tasks", "followed", "Tasks followed until they end, waited on or not"),
)
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
        self._children: dict[tuple[str, str, object], tuple[Any, ...]] = {}  # bounded label sets

        self.engine_counters = {
            key: Counter(name, text, registry=self.registry) for name, key, text in ENGINE_COUNTERS}
        self.engine_gauges = {  # livesum: with several workers, the sum over the live ones
            key: Gauge(name, text, registry=self.registry, multiprocess_mode="livesum")
            for name, key, text in ENGINE_GAUGES}
        info = Gauge("zimage_info", "The gateway's version", ["version"], registry=self.registry,
                     multiprocess_mode="max")
        info.labels(__version__).set(1)
        self._sources: list[Callable[[], dict[str, float]]] = []
        self._synced: dict[str, float] = {}
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    def watch(self, watcher: TaskWatcher, idempotency: IdempotencyStore, store: Store) -> None:
        """Report the engine's counts and state, read from their owners by sync()."""
        self._sources.append(lambda: {**watcher.counters, "replays": idempotency.replays, "waiting": watcher.waiting,
                                      "polling": watcher.active_polls, "cached": len(watcher.cache),
                                      "followed": watcher.followed, "store_dropped": store.dropped})

    def watch_webhooks(self, deliverer: Any) -> None:
        """Webhook deliveries by outcome, and the backlog as the deliverer last counted it (the
        store's, shared by a fleet: the largest of the workers' counts, never their sum)."""
        deliveries = Counter("zimage_webhook_deliveries", "Webhook attempts, by outcome (delivered, retried, failed, "
                             "disabled)", ["outcome"], registry=self.registry)
        pending = Gauge("zimage_webhook_pending", "Webhook messages waiting to be delivered", registry=self.registry,
                        multiprocess_mode="max")
        oldest = Gauge("zimage_webhook_oldest_pending_seconds", "Age of the oldest webhook message waiting",
                       registry=self.registry, multiprocess_mode="max")
        synced: dict[str, int] = {}

        def sync() -> dict[str, float]:
            for outcome, count in deliverer.outcomes.items():
                if count > synced.get(outcome, 0):
                    deliveries.labels(outcome).inc(count - synced.get(outcome, 0))
                    synced[outcome] = count
            pending.set(deliverer.pending)
            oldest.set(deliverer.oldest_pending_age)
            return {}
        self._sources.append(sync)

    def watch_pictures(self, keeper: Any) -> None:
        """Pictures kept, removed (evicted by the budget, expired by age) and fetches that failed."""
        pictures = Counter("zimage_pictures", "Kept pictures, by event (stored, evicted, expired, failed)",
                           ["event"], registry=self.registry)
        kept = Gauge("zimage_pictures_bytes", "Bytes of kept pictures, as this process last counted them",
                     registry=self.registry, multiprocess_mode="max")
        synced: dict[str, int] = {}

        def sync() -> dict[str, float]:
            counts = {**keeper.shelf.counters, "failed": keeper.failed}
            for event, count in counts.items():
                if count > synced.get(event, 0):
                    pictures.labels(event).inc(count - synced.get(event, 0))
                    synced[event] = count
            kept.set(keeper.shelf.usage()["bytes"])
            return {}
        self._sources.append(sync)

    def sync(self) -> None:
        """Carries the engine's counts (as increments since the last sync) and state into the metrics."""
        values: dict[str, float] = {}
        for source in self._sources:
            values.update(source())
        for key, counter in self.engine_counters.items():
            delta = values.get(key, 0) - self._synced.get(key, 0)
            if delta > 0:
                counter.inc(delta)
                self._synced[key] = values.get(key, 0)
        for key, gauge in self.engine_gauges.items():
            gauge.set(values.get(key, 0))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # Label values from fixed sets only: a client chooses its method, and each new value
        # would be a new series kept for ever.
        method = method if method in METHODS else "other"
        self._observe((route, method, status), self.requests, (route, method, str(status)),
                      self.latency, (route,), seconds)

    def observe_submit(self, key: str, images: int) -> None:
        # key names: a bounded set (the keys configured, and anonymous)
        submits, images_made = self._bound(("submit", key, None), (self.submits, (key,)), (self.images, (key,)))
        submits.inc()
        images_made.inc(images)

    def observe_refusal(self, key: str, reason: str) -> None:
        self.refused.labels(key, reason).inc()

    def observe_upstream(self, kind: str, outcome: str, seconds: float) -> None:
        self._observe(("upstream", kind, outcome), self.upstream_calls, (kind, outcome),
                      self.upstream_latency, (kind,), seconds)

    def _observe(self, key: tuple[str, str, object], counter: Counter, counter_labels: tuple[str, ...],
                 histogram: Histogram, histogram_labels: tuple[str, ...], seconds: float) -> None:
        calls, latency = self._bound(key, (counter, counter_labels), (histogram, histogram_labels))
        calls.inc()
        latency.observe(seconds)

    def _bound(self, key: tuple[str, str, object], *metrics: tuple[Any, tuple[str, ...]]) -> tuple[Any, ...]:
        """The metrics' children for these labels, bound once (labels() is a locked lookup)."""
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = tuple(metric.labels(*labels) for metric, labels in metrics)
        return children

    def render(self) -> bytes:
        self.sync()
        if not self.multiprocess:
            return generate_latest(self.registry)
        group = CollectorRegistry()
        multiprocess.MultiProcessCollector(group)  # every worker's files, dead ones' counters included
        return generate_latest(group)


