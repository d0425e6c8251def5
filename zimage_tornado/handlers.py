"""Thin request handlers: parse, hand a value to the module that owns the next step, render.

Every error leaves through BaseHandler.write_error as an OpenAI error envelope, and is logged
once (log_exception) with the method, path and task uuid.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import math
import os
import re
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler, stream_request_body

from zimage_tornado import SERVICE_NAME, __version__, access, logs, openai_api, openapi, validation
from zimage_tornado.domain import COMPLETED, FAILED, Task
from zimage_tornado.errors import ApiError, envelope, invalid
from zimage_tornado.metrics import CONTENT_TYPE
from zimage_tornado.upstream import UpstreamError
from zimage_tornado.watcher import INTERRUPTED, TIMEOUT, Outcome, TooManyWaiters

if TYPE_CHECKING:
    from zimage_tornado.app import Gateway

log = logging.getLogger("zimage_tornado.handlers")


PLAYGROUND_PAGE = (Path(__file__).parent / "static" / "playground.html").read_bytes()
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_PREFIX = uuidlib.uuid4().hex[:16]
REQUEST_COUNTER = itertools.count()


def _new_request_id_prefix() -> None:
    global REQUEST_ID_PREFIX
    REQUEST_ID_PREFIX = uuidlib.uuid4().hex[:16]


os.register_at_fork(after_in_child=_new_request_id_prefix)  # --processes workers must not share ids
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-ID"
CORS_EXPOSE_HEADERS = "X-Request-ID, x-should-retry, Retry-After"


@stream_request_body  # so that an oversize body is refused (413) before it is read
class BaseHandler(RequestHandler):
    route = "other"  # the metrics label: a route template, never a raw path
    open_during_shutdown = False
    task_uuid: str | None = None  # named in error logs once known
    submitted = False  # the upstream accepted a task for this request: a retry would pay twice
    _waiting: asyncio.Future[Outcome] | None = None

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._body: list[bytes] = []
        self._body_size = 0

    @functools.cached_property
    def request_id(self) -> str:
        given = self.request.headers.get("X-Request-ID", "")
        # Made up: unique, not secret, so a random per-process prefix and a counter (no syscall).
        return given if REQUEST_ID_RE.fullmatch(given) else "%s%016x" % (REQUEST_ID_PREFIX, next(REQUEST_COUNTER))

    def set_default_headers(self) -> None:
        # Also called when an error clears the response: these survive into error answers.
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("X-Request-ID", self.request_id)
        origin = self.request.headers.get("Origin")
        origins = self.application.gateway.settings.origins  # type: ignore[attr-defined]
        if origin and ("*" in origins or origin in origins):
            self.set_header("Access-Control-Allow-Origin", "*" if "*" in origins else origin)
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)
            self.set_header("Vary", "Origin")

    def prepare(self) -> None:
        self.gateway.active.add(self)
        logs.request_id.set(self.request_id)
        settings = self.gateway.settings
        self.client_ip = access.client_address(self.request.remote_ip, self.request.headers,
                                               settings.proxy_networks)
        if self.request.method == "OPTIONS":
            return  # a CORS preflight: browsers send it without credentials
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > settings.max_body_bytes:
            self.body_too_large()
        chunked = "chunked" in self.request.headers.get("Transfer-Encoding", "").lower()
        if chunked or (length.isdigit() and int(length) > 0):
            if self.request.method != "POST":  # no GET of ours takes a body: do not wait for one
                raise ApiError(400, "%s requests take no body" % self.request.method, code="unexpected_body",
                               headers={"Connection": "close"})
            self.gateway.bodies.expect(self, self.body_too_slow)
        if self.gateway.shutting_down and not self.open_during_shutdown:
            raise ApiError(503, "The gateway is shutting down; retry shortly", type="server_error",
                           code="shutting_down", headers={"Retry-After": self.retry_after, "Connection": "close"})
        if self.request.path.startswith("/v1/") or (self.route == "/metrics" and settings.metrics_require_key):
            self.check_api_key()

    def check_api_key(self) -> None:
        keys = self.gateway.api_keys
        # No keys configured: any bearer, as the spec's "zimage-free" examples expect.
        if keys and not access.bearer_allowed(self.request.headers.get("Authorization", ""), keys):
            raise ApiError(401, "Invalid or missing API key: send Authorization: Bearer <key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="zimage-tornado"'})

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size <= self.gateway.settings.max_body_bytes:
            self._body.append(chunk)
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and self._body_size >= int(length):
            self.gateway.bodies.received(self)

    def body_too_slow(self) -> None:
        log.info("%s %s: the body did not arrive within body_timeout; closing the connection",
                 self.request.method, self.request.path)
        self.request.connection.stream.close()  # type: ignore[union-attr]

    def body_too_large(self) -> None:
        raise ApiError(413, "The request body is larger than %d bytes" % self.gateway.settings.max_body_bytes,
                       code="body_too_large", headers={"Connection": "close"})

    def options(self, *args: str) -> None:
        if "Access-Control-Allow-Origin" in self._headers:
            self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
            self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def on_finish(self) -> None:
        self.gateway.active.discard(self)
        self.gateway.bodies.received(self)

    def finish(self, chunk: Any = None) -> asyncio.Future[None]:
        return self.within_write_timeout(super().finish(chunk))

    def within_write_timeout(self, written: asyncio.Future[None]) -> asyncio.Future[None]:
        """A client that stops reading would pin this connection, and the answer buffered for it,
        for ever: past write_timeout the connection is closed."""
        if not written.done():
            stream = self.request.connection.stream  # type: ignore[union-attr]
            timer = asyncio.get_running_loop().call_later(
                self.gateway.settings.write_timeout, lambda: written.done() or stream.close())
            written.add_done_callback(lambda _: timer.cancel())
        return written

    # -- input ---------------------------------------------------------------------------------

    def json_body(self) -> Any:
        self.gateway.bodies.received(self)  # the method runs once the whole body is in
        if self._body_size > self.gateway.settings.max_body_bytes:
            self.body_too_large()
        body = b"".join(self._body)
        if not body:
            raise invalid("The request body is empty; send a JSON object", code="invalid_json")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise invalid("The request body is not valid JSON", code="invalid_json") from None

    # -- output --------------------------------------------------------------------------------

    def send(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.set_status(status)
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self.finish(json.dumps(body, ensure_ascii=False))

    def api_error(self, exc: BaseException | None, status_code: int = 500) -> ApiError:
        error = self._api_error(exc, status_code)
        if self.submitted and self.task_uuid:
            # The task exists upstream: the OpenAI SDK must not resubmit (and pay) again.
            error.headers["x-should-retry"] = "false"
            if self.task_uuid not in error.message:
                error.message += " (task %s was accepted; fetch it later with GET /v1/images/%s)" % (
                    self.task_uuid, self.task_uuid)
            error.extra.setdefault("uuid", self.task_uuid)
        return error

    def _api_error(self, exc: BaseException | None, status_code: int) -> ApiError:
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, UpstreamError):
            headers = {"Retry-After": str(math.ceil(exc.retry_after))} if exc.retry_after else {}
            extra = {"uuid": self.task_uuid} if self.task_uuid else {}
            return ApiError(exc.status, str(exc), type="upstream_error", code=exc.code, headers=headers, extra=extra)
        if isinstance(exc, TooManyWaiters):
            return ApiError(503, "Too many clients are waiting on tasks; retry shortly", type="server_error",
                            code="too_many_waiters", headers={"Retry-After": self.retry_after})
        if isinstance(exc, HTTPError) or exc is None:
            status = exc.status_code if isinstance(exc, HTTPError) else status_code
            message = self._reason if status == self.get_status() else "HTTP %d" % status
            if status == 405:
                message = "Method %s is not allowed on %s" % (self.request.method, self.request.path)
            return ApiError(status, message, type="invalid_request_error" if status < 500 else "server_error")
        # Never show a client the text of an unexpected exception.
        return ApiError(500, "Internal server error", type="server_error", code="internal_error")

    @property
    def retry_after(self) -> str:
        return str(math.ceil(self.gateway.settings.poll_interval))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error = self.api_error(exc, status_code)
        if error.status in (400, 413) and self._body_size > self.gateway.settings.max_body_bytes:
            error.headers["Connection"] = "close"  # the rest of the body is not worth reading
        self.send(error.body(), error.status, error.headers)

    def log_exception(self, typ, value, tb) -> None:  # type: ignore[no-untyped-def]
        if isinstance(value, StreamClosedError):
            log.info("%s %s (task %s): the client went away", self.request.method, self.request.path,
                     self.task_uuid or "-")
            return
        if not isinstance(value, (ApiError, UpstreamError, TooManyWaiters, HTTPError)):
            log.error("%s %s (task %s): unexpected error", self.request.method, self.request.path,
                      self.task_uuid or "-", exc_info=(typ, value, tb))
            return
        self.log_error(self.api_error(value))

    def log_error(self, error: ApiError) -> None:
        log.warning("%s %s (task %s) -> %d %s: %s", self.request.method, self.request.path,
                    self.task_uuid or "-", error.status, error.code or error.type, error.message)

    # -- tasks ---------------------------------------------------------------------------------

    async def submit(self, request: Any) -> Task:
        key = validation.idempotency_key(self.request.headers.get("Idempotency-Key"))
        task = await self.gateway.submit(request, key)
        self.task_uuid, self.submitted = task.uuid, True
        return task

    async def wait_for_task(self, budget: float | None = None,
                            on_tick: Callable[[Task | None], Awaitable[None]] | None = None) -> Outcome | None:
        """This request's task outcome from the shared engine; None when the client hung up.
        `on_tick` is called after every status read while the task runs (for streams)."""
        watcher = self.gateway.watcher
        self._waiting = waiting = watcher.wait(self.task_uuid, budget)  # type: ignore[arg-type]
        try:
            while on_tick is not None and not waiting.done():
                tick = watcher.next_tick(self.task_uuid)  # type: ignore[arg-type]
                await asyncio.wait([waiting, tick], return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    await on_tick(tick.result())
            return await waiting
        except (asyncio.CancelledError, StreamClosedError):
            waiting.cancel()
            return None  # the client left: nobody to answer
        finally:
            self._waiting = None

    def on_connection_close(self) -> None:
        # super() fails the body future of a streamed request body: without it, a client that
        # hangs up mid-body leaves this handler's coroutine pending for ever (a leak).
        super().on_connection_close()
        self.gateway.active.discard(self)
        self.gateway.bodies.received(self)
        if self._waiting is not None:
            self._waiting.cancel()  # leave the task's polling loop at once

    def finished_task(self, outcome: Outcome) -> Task:
        """The completed task, or the ApiError that the outcome means."""
        task = outcome.task
        if outcome.state == COMPLETED and task is not None:
            return task
        if outcome.state == FAILED and task is not None:
            raise openai_api.task_failed(task)
        if outcome.state == TIMEOUT:
            raise openai_api.wait_timed_out(outcome.uuid, outcome.waited, task, outcome.error)
        if outcome.state == INTERRUPTED:
            raise ApiError(503, "The gateway is shutting down; task %s goes on" % outcome.uuid, type="server_error",
                           code="shutting_down", headers={"Retry-After": self.retry_after})
        raise outcome.error or ApiError(502, "No answer for task %s" % outcome.uuid, type="upstream_error")

    # -- server-sent events ------------------------------------------------------------------------

    def start_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=UTF-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx: pass events on as they come

    async def event(self, data: Any) -> None:
        await self._emit("data: %s\n\n" % (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)))

    async def keepalive(self) -> None:
        await self._emit(": waiting\n\n")  # an SSE comment: keeps idle-timeout proxies from cutting us

    async def _emit(self, text: str) -> None:
        self.write(text)
        await self.within_write_timeout(self.flush())


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, "Unknown route: %s %s" % (self.request.method, self.request.path), code="unknown_route")


class InfoHandler(BaseHandler):
    route = "/"

    def get(self) -> None:
        accept = self.request.headers.get("Accept", "")
        if accept.startswith("text/html"):  # a person with a browser: show them the playground
            return self.redirect("/playground")
        self.send({
            "service": SERVICE_NAME,
            "version": __version__,
            "description": "OpenAI-compatible gateway for the Z-Image text-to-image service",
            "upstream": self.gateway.settings.upstream_url,
            "demo": self.gateway.settings.demo,
            "playground": "/playground",
            "endpoints": [{"method": m, "path": p, "description": d} for m, p, d in ENDPOINTS],
        })


class PlaygroundHandler(BaseHandler):
    """One self-contained page (no build step, no CDN): it works offline."""

    route = "/playground"

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        # Images come from the upstream's image host, anywhere; everything else from here.
        self.set_header("Content-Security-Policy", "default-src 'self'; img-src 'self' http: https: data:; "
                        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; frame-ancestors 'none'")
        self.finish(PLAYGROUND_PAGE)


class HealthHandler(BaseHandler):
    route = "/health"
    open_during_shutdown = True

    def get(self) -> None:
        # Liveness only: it must stay cheap and never touch the upstream.
        self.send({
            "status": "ok",
            "service": SERVICE_NAME,
            "version": __version__,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pid": os.getpid(),
        })


class ReadinessHandler(BaseHandler):
    """Ready unless shutting down; says whether the upstream answered lately, from what the
    gateway's own traffic saw (it never polls the upstream for this)."""

    route = "/health/ready"
    open_during_shutdown = True

    def get(self) -> None:
        gateway, now = self.gateway, time.monotonic()
        upstream = gateway.upstream
        window = max(60.0, 3 * gateway.settings.poll_interval)
        answered_ago = None if upstream.last_answer_at is None else round(now - upstream.last_answer_at, 3)
        failure = None
        if upstream.last_failure is not None:
            failure = {"seconds_ago": round(now - upstream.last_failure[0], 3), "error": upstream.last_failure[1]}
        status = "shutting_down" if gateway.shutting_down else "ready"
        self.send({
            "status": status,
            "upstream": {
                "url": gateway.settings.upstream_url,
                "answered_recently": answered_ago is not None and answered_ago <= window,
                "last_answer_seconds_ago": answered_ago,
                "last_failure": failure,
            },
            "waiters": gateway.watcher.waiting,
            "polling_loops": gateway.watcher.active_polls,
            "requests_in_flight": len(gateway.active) - 1,  # not counting this one
        }, 503 if gateway.shutting_down else 200)


class OpenApiHandler(BaseHandler):
    route = "/openapi.json"
    open_during_shutdown = True

    def get(self) -> None:
        self.send(openapi.document())


class MetricsHandler(BaseHandler):
    route = "/metrics"
    open_during_shutdown = True

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.gateway.metrics.render())


class ChatCompletionsHandler(BaseHandler):
    route = "/v1/chat/completions"

    async def post(self) -> None:
        gateway = self.gateway
        request = openai_api.parse_chat_request(self.json_body(), gateway.settings.limits, gateway.models)
        wait = gateway.settings.chat_wait if request.wait is None else request.wait
        if wait and request.background:
            self.completion = openai_api.completion_id(None)
            return await self.reply(request, openai_api.BACKGROUND_REPLY)  # no image job for it
        task = await self.submit(request.generation)
        self.completion = openai_api.completion_id(task.uuid)
        if not wait:
            return await self.reply(request, task.uuid)
        if request.stream:
            return await self.stream_pictures(request)
        outcome = await self.wait_for_task()
        if outcome is not None:
            done = self.finished_task(outcome)
            self.send(openai_api.chat_completion(request.model, task.uuid, openai_api.markdown_images(done.image_urls)))

    async def reply(self, request: openai_api.ChatRequest, content: str) -> None:
        if not request.stream:
            return self.send(openai_api.chat_completion(request.model, self.task_uuid, content))
        self.start_stream()
        await self.event(self.chunk(request, {"role": "assistant", "content": ""}))
        await self.event(self.chunk(request, {"content": content}))
        await self.finish_stream(request)

    async def stream_pictures(self, request: openai_api.ChatRequest) -> None:
        """Wait mode, streamed: progress lines while the task runs, then the pictures."""
        self.start_stream()
        await self.event(self.chunk(request, {"role": "assistant", "content": ""}))
        last = None  # the state last reported

        async def report(task: Task | None) -> None:
            nonlocal last
            state = task and (task.status, task.progress, task.queue_position)
            if task is not None and state != last:
                last = state
                await self.event(self.chunk(request, {"content": openai_api.progress_line(task)}))
            else:
                await self.keepalive()

        try:
            outcome = await self.wait_for_task(on_tick=report)
            if outcome is None:
                return
            if outcome.state == INTERRUPTED:  # shutting down: end the stream with where the task stands
                status = outcome.task.status if outcome.task else "submitted"
                await self.event(self.chunk(request, {"content": openai_api.restart_note(outcome.uuid, status)}))
                return await self.finish_stream(request)
            done = self.finished_task(outcome)
        except (ApiError, UpstreamError) as e:
            error = self.api_error(e)
            self.log_error(error)
            await self.event({"error": envelope(error.message, error.type, error.param, error.code)})
            return await self.finish_stream(request, chunk=False)
        separator = "\n" if last is not None else ""
        await self.event(self.chunk(request, {"content": separator + openai_api.markdown_images(done.image_urls)}))
        await self.finish_stream(request)

    def chunk(self, request: openai_api.ChatRequest, delta: dict[str, Any], finish: str | None = None) -> dict:
        chunk = openai_api.chat_chunk(self.completion, request.model, delta, finish)
        if self.task_uuid:
            chunk["task_uuid"] = self.task_uuid
        return chunk

    async def finish_stream(self, request: openai_api.ChatRequest, chunk: bool = True) -> None:
        if chunk:
            await self.event(self.chunk(request, {}, "stop"))
        await self.event("[DONE]")
        self.finish()


class ImagesGenerationsHandler(BaseHandler):
    """What `client.images.generate(...)` sends: submit, wait for the pictures, answer them."""

    route = "/v1/images/generations"

    async def post(self) -> None:
        gateway = self.gateway
        request = openai_api.parse_images_request(self.json_body(), gateway.settings.limits, gateway.models)
        await self.submit(request.generation)
        outcome = await self.wait_for_task()
        if outcome is None:
            return
        done = self.finished_task(outcome)
        b64 = await gateway.images_b64(done) if request.response_format == "b64_json" else None
        self.send(openai_api.images_response(done.image_urls, b64))


class ModelsHandler(BaseHandler):
    route = "/v1/models"

    def get(self) -> None:
        self.send(openai_api.model_list(self.gateway.models.names))


class ModelHandler(BaseHandler):
    route = "/v1/models/{model}"

    def get(self, model_id: str) -> None:
        if not self.gateway.models.knows(model_id):
            raise ApiError(404, "The model %r does not exist" % model_id[:200], param="model", code="model_not_found")
        self.send(openai_api.model_object(model_id))


class TaskHandler(BaseHandler):
    route = "/v1/tasks/{uuid}"

    async def get(self, uuid: str) -> None:
        self.task_uuid = validation.task_id(uuid)
        task = await self.gateway.watcher.peek(self.task_uuid)
        self.send(task.document)  # passed through as the upstream sent it


class ImagesHandler(BaseHandler):
    """The long-poll: answers when the task finishes or this request's budget runs out."""

    route = "/v1/images/{uuid}"

    async def get(self, uuid: str) -> None:
        self.task_uuid = validation.task_id(uuid)
        budget = validation.wait_budget(self.get_query_argument("timeout", None),
                                        self.get_query_argument("wait", None), self.gateway.settings.wait_budget)
        if budget <= 0:
            task = await self.gateway.watcher.peek(self.task_uuid)
            if not task.is_final:
                return self.still_running(task)
            outcome: Outcome | None = Outcome(task.status, task.uuid, task)
        else:
            outcome = await self.wait_for_task(budget)
            if outcome is None:
                return
            if outcome.state == INTERRUPTED:  # the gateway is shutting down: say where the task stands
                return self.still_running(outcome.task, outcome.uuid)
        self.send(openai_api.images_ready(self.finished_task(outcome)))

    def still_running(self, task: Task | None, uuid: str | None = None) -> None:
        body = openai_api.task_progress(task) if task else {"uuid": uuid, "status": "unknown"}
        self.send(body, 202, {"Retry-After": self.retry_after})


ENDPOINTS = [
    ("POST", "/v1/chat/completions", "Submit a generation task (OpenAI chat format); content is the task uuid, "
                                     "or the pictures in wait mode; stream=true answers Server-Sent Events"),
    ("POST", "/v1/images/generations", "OpenAI images.generate: submit, wait, answer URLs or b64_json"),
    ("GET", "/v1/models", "The models this gateway serves"),
    ("GET", "/v1/models/{model}", "One model"),
    ("GET", "/v1/tasks/{uuid}", "The upstream task, as the upstream reports it"),
    ("GET", "/v1/images/{uuid}", "Long-poll until the task's images are ready (?timeout=, ?wait=false)"),
    ("GET", "/health", "Liveness: cheap, never calls the upstream"),
    ("GET", "/health/ready", "Readiness: 503 while shutting down; whether the upstream answered recently"),
    ("GET", "/metrics", "Prometheus metrics"),
    ("GET", "/openapi.json", "The OpenAPI 3.1 description of these endpoints"),
    ("GET", "/playground", "A page to try it in a browser: prompt to pictures"),
    ("GET", "/", "This service description (browsers are sent to the playground)"),
]
