"""make_app(): the route table and the objects every handler shares."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from tornado.web import Application

from zimage_tornado import handlers
from zimage_tornado.cache import ResultCache
from zimage_tornado.config import Settings
from zimage_tornado.deadlines import BodyDeadlines
from zimage_tornado.domain import GenerationRequest, Task
from zimage_tornado.idempotency import IdempotencyStore
from zimage_tornado.metrics import Metrics
from zimage_tornado.openai_api import ModelTable
from zimage_tornado.upstream import ZImageClient, make_http_client
from zimage_tornado.watcher import TaskWatcher

access_log = logging.getLogger("zimage_tornado.access")


class Gateway:
    """What the handlers share: settings, the upstream client and the long-poll engine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.http = make_http_client(
            settings.upstream_client,
            max_clients=settings.upstream_max_clients,
            connect_timeout=settings.upstream_connect_timeout,
            request_timeout=settings.upstream_timeout,
            ca_certs=settings.upstream_ca_certs,
        )
        self.metrics = Metrics(self)
        self.upstream = ZImageClient(settings.upstream_url, self.http, observer=self.metrics.observe_upstream)
        self.watcher = TaskWatcher(
            self.upstream,
            interval=settings.poll_interval,
            max_attempts=settings.max_attempts,
            max_waiters=settings.max_waiters,
            cache=ResultCache(settings.cache_size, settings.cache_ttl),
        )
        self.models = ModelTable(settings.aliases)
        self.idempotency = IdempotencyStore(settings.idempotency_ttl, settings.cache_size)
        self.api_keys = settings.load_api_keys()
        self.shutting_down = False
        self.bodies = BodyDeadlines(settings.body_timeout)
        self.active: set[Any] = set()  # handlers of requests being served, for a graceful stop

    async def submit(self, request: GenerationRequest, idempotency_key: str | None = None) -> Task:
        if idempotency_key is None:
            return await self.upstream.submit(request)
        return await self.idempotency.submit(idempotency_key, request, self.upstream.submit)

    async def images_b64(self, task: Task) -> list[str]:
        """The task's images, fetched concurrently and base64-encoded, in order."""
        images = await asyncio.gather(*(self.upstream.fetch_image(url, self.settings.max_image_bytes)
                                        for url in task.image_urls))
        return [base64.b64encode(image).decode("ascii") for image in images]

    async def close(self) -> None:
        await self.watcher.close()
        self.http.close()


def log_request(handler: Any) -> None:
    """Application log_function: metrics for every request, and one access line each (errors
    were already logged, with their cause, by the handler)."""
    seconds = handler.request.request_time()
    gateway = getattr(handler, "gateway", None)  # absent for tornado's own handlers
    if gateway is not None:
        gateway.metrics.observe_request(getattr(handler, "route", "other"), handler.request.method,
                                        handler.get_status(), seconds)
    if access_log.isEnabledFor(logging.INFO):  # skip the formatting work when nobody reads it
        access_log.info("%d %s %s (%s) %.1fms", handler.get_status(), handler.request.method, handler.request.uri,
                        getattr(handler, "client_ip", handler.request.remote_ip), 1000.0 * seconds)


def make_app(settings: Settings, gateway: Gateway | None = None) -> Application:
    gateway = gateway or Gateway(settings)
    shared = {"gateway": gateway}
    routes = [
        (r"/", handlers.InfoHandler, shared),
        (r"/playground", handlers.PlaygroundHandler, shared),
        (r"/health", handlers.HealthHandler, shared),
        (r"/health/ready", handlers.ReadinessHandler, shared),
        (r"/metrics", handlers.MetricsHandler, shared),
        (r"/openapi.json", handlers.OpenApiHandler, shared),
        (r"/v1/chat/completions", handlers.ChatCompletionsHandler, shared),
        (r"/v1/images/generations", handlers.ImagesGenerationsHandler, shared),
        (r"/v1/models", handlers.ModelsHandler, shared),
        (r"/v1/models/([^/]+)", handlers.ModelHandler, shared),
        (r"/v1/tasks/([^/]+)", handlers.TaskHandler, shared),
        (r"/v1/images/([^/]+)", handlers.ImagesHandler, shared),
    ]
    app = Application(
        routes,
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args=shared,
        log_function=log_request,
    )
    app.gateway = gateway  # type: ignore[attr-defined]
    return app
