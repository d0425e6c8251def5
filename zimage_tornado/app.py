"""make_app(): the application, its routes from web/routes.py and the gateway every handler shares."""

from __future__ import annotations

import logging
from typing import Any

from tornado.web import Application

from zimage_tornado.config import Settings
from zimage_tornado.gateway import Gateway
from zimage_tornado.web.handlers import NotFoundHandler, UnsupportedHandler
from zimage_tornado.web.routes import ENDPOINTS, ROUTES, UNSUPPORTED, Route

access_log = logging.getLogger("zimage_tornado.access")


def log_request(handler: Any) -> None:
    """Application log_function: metrics for every request, and one access line each (errors
    were already logged, with their cause, by the handler)."""
    seconds = handler.request.request_time()
    gateway = getattr(handler, "gateway", None)  # absent for tornado's own handlers
    if gateway is not None:
        gateway.metrics.observe_request(handler.route, handler.request.method, handler.get_status(), seconds)
    if access_log.isEnabledFor(logging.INFO):  # skip the formatting work when nobody reads it
        # The path, not the URI: a query string may hold a pasted key.
        # The key's name (never the key) says who; the request id is on every line already; the
        # task (a submit's new one, or the one read) makes this the one line a submit needs.
        caller = getattr(handler, "caller", None)
        access_log.info("%d %s %s (%s) key=%s task=%s %.1fms", handler.get_status(), handler.request.method,
                        handler.request.path, getattr(handler, "client_ip", handler.request.remote_ip),
                        caller.name if caller is not None else "-", getattr(handler, "task_uuid", None) or "-",
                        1000.0 * seconds)


def make_app(settings: Settings, gateway: Gateway | None = None) -> Application:
    gateway = gateway or Gateway(settings)
    app = Application(
        # Unsupported first: /v1/images/edits would otherwise be taken for /v1/images/{uuid}.
        [(Route(path, UnsupportedHandler, (), "").pattern, UnsupportedHandler, {"gateway": gateway, "route": path})
         for path in UNSUPPORTED]
        + [(route.pattern, route.handler, {"gateway": gateway, "route": route.template}) for route in ROUTES],
        default_handler_class=NotFoundHandler,
        default_handler_args={"gateway": gateway},
        log_function=log_request,
        endpoints=ENDPOINTS,
        cors_origins=settings.origins,
    )
    app.gateway = gateway  # type: ignore[attr-defined]
    return app


def make_metrics_app(gateway: Gateway) -> Application:
    """metrics_port: GET /metrics alone, without keys, for a listener the operator keeps private."""
    from zimage_tornado.web.handlers import MetricsHandler

    return Application([("/metrics", MetricsHandler, {"gateway": gateway, "route": "/metrics"})],
                       default_handler_class=NotFoundHandler, default_handler_args={"gateway": gateway},
                       endpoints=ENDPOINTS, cors_origins=frozenset(), metrics_listener=True)
