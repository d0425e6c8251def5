"""Thin request handlers: parse, hand a value to the module that owns the next step, render.

Every error leaves through BaseHandler.write_error as an OpenAI error envelope, and is logged
once (log_exception) with the method, path and task uuid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from tornado.web import HTTPError, RequestHandler

from zimage_tornado import SERVICE_NAME, __version__, openai_api, validation
from zimage_tornado.errors import ApiError, invalid
from zimage_tornado.upstream import UpstreamError
from zimage_tornado.watcher import INTERRUPTED, TIMEOUT, Outcome, TooManyWaiters

if TYPE_CHECKING:
    from zimage_tornado.app import Gateway

log = logging.getLogger("zimage_tornado.handlers")


class BaseHandler(RequestHandler):
    task_uuid: str | None = None  # named in error logs once known

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")

    def json_body(self) -> Any:
        if not self.request.body:
            raise invalid("The request body is empty; send a JSON object", code="invalid_json")
        try:
            return json.loads(self.request.body)
        except (ValueError, UnicodeDecodeError):
            raise invalid("The request body is not valid JSON", code="invalid_json") from None

    def send(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.set_status(status)
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self.finish(json.dumps(body, ensure_ascii=False))

    def api_error(self, exc: BaseException | None, status_code: int = 500) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, UpstreamError):
            headers = {"Retry-After": str(math.ceil(exc.retry_after))} if exc.retry_after else {}
            extra = {"uuid": self.task_uuid} if self.task_uuid else {}
            return ApiError(exc.status, str(exc), type="upstream_error", code=exc.code, headers=headers, extra=extra)
        if isinstance(exc, TooManyWaiters):
            return ApiError(503, "Too many clients are waiting on tasks; retry shortly", type="server_error",
                            code="too_many_waiters",
                            headers={"Retry-After": str(math.ceil(self.gateway.settings.poll_interval))})
        if isinstance(exc, HTTPError) or exc is None:
            status = exc.status_code if isinstance(exc, HTTPError) else status_code
            message = self._reason if status == self.get_status() else "HTTP %d" % status
            if status == 405:
                message = "Method %s is not allowed on %s" % (self.request.method, self.request.path)
            return ApiError(status, message, type="invalid_request_error" if status < 500 else "server_error")
        # Never show a client the text of an unexpected exception.
        return ApiError(500, "Internal server error", type="server_error", code="internal_error")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error = self.api_error(exc, status_code)
        self.send(error.body(), error.status, error.headers)

    def log_exception(self, typ, value, tb) -> None:  # type: ignore[no-untyped-def]
        known = isinstance(value, (ApiError, UpstreamError, TooManyWaiters, HTTPError))
        if not known:
            log.error("%s %s (task %s): unexpected error", self.request.method, self.request.path,
                      self.task_uuid or "-", exc_info=(typ, value, tb))
            return
        error = self.api_error(value)
        log.warning("%s %s (task %s) -> %d %s: %s", self.request.method, self.request.path,
                    self.task_uuid or "-", error.status, error.code or error.type, error.message)


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise ApiError(404, "Unknown route: %s %s" % (self.request.method, self.request.path), code="unknown_route")


class InfoHandler(BaseHandler):
    def get(self) -> None:
        self.send({
            "service": SERVICE_NAME,
            "version": __version__,
            "description": "OpenAI-compatible gateway for the Z-Image text-to-image service",
            "upstream": self.gateway.settings.upstream_url,
            "endpoints": [{"method": m, "path": p, "description": d} for m, p, d in ENDPOINTS],
        })


class HealthHandler(BaseHandler):
    def get(self) -> None:
        # Liveness only: it must stay cheap and never touch the upstream.
        self.send({
            "status": "ok",
            "service": SERVICE_NAME,
            "version": __version__,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })


class ChatCompletionsHandler(BaseHandler):
    async def post(self) -> None:
        request = openai_api.parse_chat_request(self.json_body(), self.gateway.settings.limits, self.gateway.models)
        task = await self.gateway.upstream.submit(request.generation)
        self.task_uuid = task.uuid
        self.send(openai_api.chat_completion(request.model, task.uuid))


class TaskHandler(BaseHandler):
    async def get(self, uuid: str) -> None:
        self.task_uuid = validation.task_id(uuid)
        task = await self.gateway.watcher.peek(self.task_uuid)
        self.send(task.document)  # passed through as the upstream sent it


class ImagesHandler(BaseHandler):
    """The long-poll: answers when the task finishes or this request's budget runs out."""

    _waiting: asyncio.Future[Outcome] | None = None

    async def get(self, uuid: str) -> None:
        self.task_uuid = validation.task_id(uuid)
        budget = validation.wait_budget(self.get_query_argument("timeout", None),
                                        self.get_query_argument("wait", None), self.gateway.settings.wait_budget)
        watcher = self.gateway.watcher
        if budget <= 0:
            task = await watcher.peek(self.task_uuid)
            return self.answer(Outcome(task.status, task.uuid, task, None, 0))
        self._waiting = watcher.wait(self.task_uuid, budget)
        try:
            outcome = await self._waiting
        except asyncio.CancelledError:
            return  # the client left: nobody to answer
        finally:
            self._waiting = None
        self.answer(outcome)

    def on_connection_close(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()  # leave the task's polling loop at once

    def answer(self, outcome: Outcome) -> None:
        task = outcome.task
        if outcome.state == "completed" and task is not None:
            return self.send(openai_api.images_ready(task))
        if outcome.state == "failed" and task is not None:
            raise openai_api.task_failed(task)
        if outcome.state == TIMEOUT:
            raise openai_api.wait_timed_out(outcome.uuid, outcome.waited, task, outcome.error)
        if outcome.error is not None and outcome.state != INTERRUPTED:
            raise outcome.error  # NOT_FOUND or a definite upstream refusal
        # still running: a `wait=false` answer, or a wait cut short by shutdown
        body = openai_api.task_progress(task) if task else {"uuid": outcome.uuid, "status": "unknown"}
        retry_after = str(math.ceil(self.gateway.settings.poll_interval))
        self.send(body, 202, {"Retry-After": retry_after})


ENDPOINTS = [
    ("POST", "/v1/chat/completions", "Submit a generation task (OpenAI chat format); content is the task uuid"),
    ("GET", "/v1/tasks/{uuid}", "The upstream task, as the upstream reports it"),
    ("GET", "/v1/images/{uuid}", "Long-poll until the task's images are ready (?timeout=, ?wait=false)"),
    ("GET", "/health", "Liveness"),
    ("GET", "/", "This service description"),
]
