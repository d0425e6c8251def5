"""The route table: the one list of endpoints. It feeds the application's routes, the metrics
label of every request, the info page at GET / and the paths of /openapi.json."""

from __future__ import annotations

import re
from dataclasses import dataclass

from zimage_tornado.web import handlers
from zimage_tornado.web.base import BaseHandler


@dataclass(frozen=True)
class Route:
    template: str  # as documented and as the metrics label: /v1/images/{uuid}
    handler: type[BaseHandler]
    methods: tuple[str, ...]
    description: str

    @property
    def pattern(self) -> str:
        """The template as Tornado's regex: each {name} matches one path segment."""
        return re.sub(r"\{[a-z_]+\}", "([^/]+)", self.template) + "$"


ROUTES = (
    Route("/v1/chat/completions", handlers.ChatCompletionsHandler, ("POST",),
          "Submit a generation task (OpenAI chat format); content is the task uuid, or the pictures in wait mode; "
          "stream=true answers Server-Sent Events"),
    Route("/v1/completions", handlers.CompletionsHandler, ("POST",),
          "Legacy completions (LangChain's OpenAI, llama-index): as chat; choices[0].text is the task uuid, "
          "or the pictures in wait mode"),
    Route("/v1/images/generations", handlers.ImagesGenerationsHandler, ("POST",),
          "OpenAI images.generate: submit, wait, answer URLs or b64_json"),
    Route("/v1/images/generations/{uuid}", handlers.ImagesResultHandler, ("GET",),
          "A handed-off images.generate task's answer, as the POST would have given it (?response_format=, "
          "?output_format=, ?output_compression=); 202 while it runs"),
    Route("/v1/models", handlers.ModelsHandler, ("GET",), "The models this gateway serves"),
    Route("/v1/models/{model}", handlers.ModelHandler, ("GET",), "One model"),
    Route("/v1/tasks", handlers.TaskListHandler, ("GET",),
          "Your tasks, newest first, in OpenAI's list shape (?limit=, ?after=, ?status=; admins ?key=)"),
    Route("/v1/tasks/{uuid}", handlers.TaskHandler, ("GET",), "The upstream task, as the upstream reports it"),
    Route("/v1/tasks/{uuid}/events", handlers.TaskEventsHandler, ("GET",),
          "Server-sent events of one task: progress, then completed, failed or expired"),
    Route("/v1/webhooks", handlers.WebhooksHandler, ("GET",),
          "Your webhook messages and their delivery, newest first (?status=, ?limit=)"),
    Route("/v1/images/{uuid}", handlers.ImagesHandler, ("GET",),
          "Long-poll until the task's images are ready (?timeout=, ?wait=false)"),
    Route("/v1/images/{uuid}/{index}", handlers.PictureHandler, ("GET",),
          "One picture of a finished task, kept by the gateway (pictures=keep): with its link's signature "
          "(?expires=&signature=) no key is needed; ?format=, ?compression= convert it; Range, ETag"),
    Route("/health", handlers.HealthHandler, ("GET",), "Liveness: cheap, never calls the upstream"),
    Route("/health/ready", handlers.ReadinessHandler, ("GET",),
          "Readiness: 503 while shutting down; whether the upstream answered recently"),
    Route("/metrics", handlers.MetricsHandler, ("GET",), "Prometheus metrics"),
    Route("/openapi.json", handlers.OpenApiHandler, ("GET",), "The OpenAPI 3.1 description of these endpoints"),
    Route("/favicon.ico", handlers.IconHandler, ("GET",), "The pages' icon (SVG)"),
    Route("/playground", handlers.PlaygroundHandler, ("GET",), "A page to try it in a browser: prompt to pictures"),
    Route("/admin/usage", handlers.AdminUsageHandler, ("GET",),
          "Admin keys: tasks, images, failed and refused per key and UTC day (?since=, ?until=, ?key=)"),
    Route("/admin/usage.csv", handlers.AdminUsageCsvHandler, ("GET",),
          "Admin keys: the usage table as CSV (?since=, ?until=, ?key=)"),
    Route("/admin/tasks", handlers.AdminTasksHandler, ("GET",),
          "Admin keys: recorded tasks, newest first, a page at a time (?key=, ?status=, ?since=, ?until=, "
          "?limit=, ?before=)"),
    Route("/admin/tasks.csv", handlers.AdminTasksCsvHandler, ("GET",),
          "Admin keys: the filtered tasks as CSV (the same filters; up to 10,000 rows)"),
    Route("/admin/keys", handlers.AdminKeysHandler, ("GET",),
          "Admin keys: every key's limits, today's use and when it last submitted (never a secret)"),
    Route("/admin/pictures", handlers.AdminPicturesHandler, ("GET",),
          "Admin keys: the picture store: where, bytes, pictures, budget, age limit, oldest picture, and pictures "
          "stored, evicted, expired and failed since start"),
    Route("/admin/webhooks", handlers.AdminWebhooksHandler, ("GET",),
          "Admin keys: webhook messages with their URL, type, attempts, last status or error and next attempt "
          "(?key=, ?status=, ?limit=)"),
    Route("/admin/webhooks/{id}/retry", handlers.AdminWebhookRetryHandler, ("POST",),
          "Admin keys: send a webhook message again now (and enable its URL again for its key)"),
    Route("/admin", handlers.AdminPageHandler, ("GET",), "A page for admins: usage per key over 30 days, recent tasks"),
    Route("/", handlers.InfoHandler, ("GET",), "This service description (browsers are sent to the playground)"),
)

# OpenAI endpoints the gateway does not offer: a 404 that says so (not a 405 or "unknown route").
UNSUPPORTED = ("/v1/images/edits", "/v1/images/variations", "/v1/embeddings", "/v1/audio/{any}",
               "/v1/audio/{any}/{more}", "/v1/responses", "/v1/responses/{any}")

# (method, path template, description) for every endpoint: the info page, the docs, the tests.
ENDPOINTS = tuple((method, route.template, route.description) for route in ROUTES for method in route.methods)
