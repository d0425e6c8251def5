"""make_app(): the route table and the objects every handler shares."""

from __future__ import annotations

import logging
from typing import Any

from tornado.web import Application

from zimage_tornado import handlers
from zimage_tornado.cache import ResultCache
from zimage_tornado.config import Settings
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
        self.upstream = ZImageClient(settings.upstream_url, self.http)
        self.watcher = TaskWatcher(
            self.upstream,
            interval=settings.poll_interval,
            max_attempts=settings.max_attempts,
            max_waiters=settings.max_waiters,
            cache=ResultCache(settings.cache_size, settings.cache_ttl),
        )
        self.models = ModelTable()

    async def close(self) -> None:
        await self.watcher.close()
        self.http.close()


def log_request(handler: Any) -> None:
    # One access line per request; errors were already logged, with their cause, by the handler.
    access_log.info("%d %s %.1fms", handler.get_status(), handler._request_summary(),
                    1000.0 * handler.request.request_time())


def make_app(settings: Settings, gateway: Gateway | None = None) -> Application:
    gateway = gateway or Gateway(settings)
    shared = {"gateway": gateway}
    routes = [
        (r"/", handlers.InfoHandler, shared),
        (r"/health", handlers.HealthHandler, shared),
        (r"/v1/chat/completions", handlers.ChatCompletionsHandler, shared),
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
