"""Gateway: the objects every request shares, built once from the settings.

It sits below the HTTP layer: handlers receive it, nothing here knows about handlers."""

from __future__ import annotations

from typing import Any

from zimage_tornado.cache import ResultCache
from zimage_tornado.config import Settings
from zimage_tornado.deadlines import BodyDeadlines
from zimage_tornado.domain import GenerationRequest, Task
from zimage_tornado.idempotency import IdempotencyStore
from zimage_tornado.images import ImageFetcher, make_image_client
from zimage_tornado.metrics import Metrics
from zimage_tornado.openai_api import ModelTable
from zimage_tornado.upstream import ZImageClient, make_http_client
from zimage_tornado.watcher import TaskWatcher


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = make_http_client(
            settings.upstream_client,
            max_clients=settings.upstream_max_clients,
            connect_timeout=settings.upstream_connect_timeout,
            request_timeout=settings.upstream_timeout,
            ca_certs=settings.upstream_ca_certs,
        )
        self.idempotency = IdempotencyStore(settings.idempotency_ttl, settings.cache_size)
        self.metrics = Metrics()
        self.image_http = make_image_client(
            upstream_url=settings.upstream_url, image_hosts=settings.image_origins, max_clients=settings.image_fetches,
            max_bytes=settings.max_image_bytes, connect_timeout=settings.upstream_connect_timeout,
            request_timeout=settings.upstream_timeout, ca_certs=settings.upstream_ca_certs or None)
        self.upstream = ZImageClient(settings.upstream_url, self.http, observer=self.metrics.observe_upstream,
                                     image_http=self.image_http)
        self.watcher = TaskWatcher(
            self.upstream,
            interval=settings.poll_interval,
            budget=settings.wait_budget,
            max_waiters=settings.max_waiters,
            cache=ResultCache(settings.cache_size, settings.cache_ttl),
        )
        self.metrics.watch(self.watcher, self.idempotency)
        self.images = ImageFetcher(self.upstream, max_bytes=settings.max_image_bytes,
                                   cache_bytes=settings.image_cache_bytes, at_once=settings.image_fetches)
        self.models = ModelTable(settings.aliases)
        self.api_keys = settings.load_api_keys()
        self.shutting_down = False
        self.bodies = BodyDeadlines(settings.body_timeout)
        self.active: set[Any] = set()  # handlers of requests being served, for a graceful stop

    async def submit(self, request: GenerationRequest, caller: str, idempotency_key: str | None = None) -> Task:
        """A new upstream task, or the one `caller` already made with `idempotency_key`."""
        if idempotency_key is None:
            return await self.upstream.submit(request)
        return await self.idempotency.submit(caller, idempotency_key, request, self.upstream.submit)

    async def close(self) -> None:
        await self.watcher.close()
        self.http.close()
        self.image_http.close()
