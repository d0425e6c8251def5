"""BaseHandler: what every endpoint shares. It reads a bounded request body within its deadline,
checks who is asking (web/access.py), answers JSON, bounds every write by write_timeout, and
turns every error into an OpenAI envelope (web/statuses.py decides which), logged once."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from types import TracebackType
from typing import Any, Awaitable, Callable

from tornado.iostream import StreamClosedError
from tornado.web import RequestHandler, stream_request_body

from zimage_tornado import logs, openai_api, validation
from zimage_tornado.accounts import Refused, TooManyCallerWaiters
from zimage_tornado.domain import COMPLETED, GenerationRequest, Task
from zimage_tornado.errors import ApiError, invalid
from zimage_tornado.gateway import Gateway
from zimage_tornado.links import LinkMaker
from zimage_tornado.store import NotRecorded
from zimage_tornado.tenants import Caller
from zimage_tornado.watcher import Outcome
from zimage_tornado.webhooks import WebhookRequest
from zimage_tornado.web import access, statuses

log = logging.getLogger("zimage_tornado.handlers")
READ_HEADERS = ("reads", "images")  # x-ratelimit-*-reads (a read counts no images)
STREAM_CHUNK = 64 * 1024  # a large answer is written (and waited for) this much at a time


def json_text(value: Any) -> str:
    """JSON for a client. Text the upstream sent may hold a lone surrogate, which UTF-8 cannot
    encode: such an answer is written with ASCII escapes instead (still valid JSON)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


@stream_request_body  # so that an oversize body is refused (413) before it is read
class BaseHandler(RequestHandler):
    open_during_shutdown = False
    task_uuid: str | None = None  # named in error logs once known
    caller: Caller  # set by prepare() for /v1/* and /admin/*
    submitted = False  # the upstream accepted a task for this request: a retry would pay twice
    _waiting: asyncio.Future[Outcome] | None = None
    streaming = False  # answering Server-Sent Events (set by EventStream.start)

    def initialize(self, gateway: Gateway, route: str = "unmatched") -> None:
        self.gateway = gateway
        self.route = route  # the route template: the metrics label, never a raw path
        self._body: list[bytes] = []
        self._body_size = 0
        self.answer_headers: dict[str, str] = {}  # sent with every answer, errors included (x-ratelimit-*)

    @functools.cached_property
    def request_id(self) -> str:
        return access.request_id(self.request.headers.get("X-Request-ID", ""))

    def set_default_headers(self) -> None:
        # Also called when an error clears the response: these survive into error answers. It runs
        # before initialize(), so what it needs comes from the application's settings.
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("X-Content-Type-Options", "nosniff")  # a picture or a JSON body is never run as a page
        self.set_header("X-Request-ID", self.request_id)
        for name, value in access.cors_headers(self.request.headers.get("Origin"),
                                               self.settings["cors_origins"]).items():
            self.set_header(name, value)

    def prepare(self) -> None:
        self.gateway.active.add(self)
        logs.request_id.set(self.request_id)
        settings = self.gateway.settings
        self.client_ip = access.client_address(self.request.remote_ip, self.request.headers,
                                               settings.proxy_networks)
        # Every request that announces a body (OPTIONS included) is bounded before anything else.
        length = self.declared_length
        if length is not None and length > settings.max_body_bytes:
            self.body_too_large()
        chunked = "chunked" in self.request.headers.get("Transfer-Encoding", "").lower()
        if chunked or length:
            if self.request.method != "POST":  # only POSTs of ours take a body: do not wait for one
                raise ApiError(400, "%s requests take no body" % self.request.method, code="unexpected_body",
                               headers={"Connection": "close"})
            self.gateway.bodies.expect(self, self.body_too_slow)
        if self.request.method == "OPTIONS":
            return  # a CORS preflight: browsers send it without credentials
        if self.gateway.shutting_down and not self.open_during_shutdown:
            raise statuses.ShuttingDown()
        if self.request.path.startswith(("/v1/", "/admin/")):
            self.identify()
        elif self.route == "/metrics" and self.gateway.keys and not (settings.metrics_public
                                                                     or self.settings.get("metrics_listener")):
            self.identify()  # it names every key and its use: for admins, or on a listener of its own
            self.require_admin()

    def identify(self) -> Caller:
        """The caller, from its API key; no keys configured: anonymous, by address (any bearer,
        as the spec's "zimage-free" examples expect). A missing or unknown key is a 401."""
        settings = self.gateway.settings
        caller = access.caller(self.gateway.keys, self.request.headers.get("Authorization", ""), self.client_ip,
                               self.gateway.anonymous_plan, (settings.ip_v4_prefix, settings.ip_v6_prefix))
        if caller is None:
            raise ApiError(401, "Invalid or missing API key: send Authorization: Bearer <key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="zimage-tornado"'})
        self.caller = caller
        return caller

    def require_admin(self) -> None:
        if not self.caller.admin:
            raise ApiError(403, "This needs an admin key", code="admin_only")

    def prefer_wait(self) -> float | None:
        """RFC 7240 `Prefer: wait=N`: answer within N seconds (capped by the wait budget), with
        the pictures if the task is done by then, else 202 and where to find it. None without it
        (a malformed preference is ignored, as preferences may be)."""
        for preference in self.request.headers.get_list("Prefer"):
            for token in preference.split(","):
                name, _, value = token.strip().partition("=")
                seconds = validation.whole_number(value.strip(), 6)
                if name.strip().lower() == "wait" and seconds is not None:
                    return min(float(seconds), self.gateway.settings.wait_budget)
        return None

    def accepted(self, outcome: Outcome, waited: float, location: str | None = None) -> None:
        """202 for a `Prefer: wait` that ran out while the task runs; `location`: where its answer
        will be (default: the task)."""
        self.send(openai_api.task_pending(outcome.task, outcome.uuid), 202, {
            "Location": location or "/v1/tasks/%s" % outcome.uuid, "Preference-Applied": "wait=%d" % waited,
            "Retry-After": self.retry_after})

    async def read_allowed(self) -> None:
        """A task read or picture download within the caller's reads_per_minute (429 past it)."""
        try:
            admission = await self.gateway.accounts.admit_read(self.caller, self.gateway.settings.reads_per_minute)
        except Refused as refused:
            self.answer_headers.update(access.rate_limit_headers(refused.admission, READ_HEADERS))
            raise
        self.answer_headers.update(access.rate_limit_headers(admission, READ_HEADERS))

    async def require_readable(self, uuid: str) -> None:
        """Another key's task is answered exactly like a task that does not exist."""
        if not await self.gateway.accounts.may_read(self.caller, uuid):
            raise ApiError(404, "Task %s was not found" % uuid, type="invalid_request_error", code="task_not_found")

    @functools.cached_property
    def declared_length(self) -> int | None:
        return validation.content_length(self.request.headers.get("Content-Length", ""))

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size <= self.gateway.settings.max_body_bytes:
            self._body.append(chunk)
        if self.declared_length is not None and self._body_size >= self.declared_length:
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
            self.set_header("Access-Control-Allow-Headers", access.CORS_ALLOW_HEADERS)
            self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.finish()

    def on_finish(self) -> None:
        self.gateway.active.discard(self)
        self.gateway.bodies.received(self)

    def on_connection_close(self) -> None:
        # super() fails the body future of a streamed request body: without it, a client that
        # hangs up mid-body leaves this handler's coroutine pending for ever (a leak).
        super().on_connection_close()
        self.gateway.active.discard(self)
        self.gateway.bodies.received(self)
        if self._waiting is not None:
            self._waiting.cancel()  # leave the task's polling loop at once

    def revoked(self) -> None:
        """The caller's key was revoked: its event stream ends, its connection closed."""
        log.info("closing a %s %s of a revoked key", self.request.method, self.route)
        if self.request.connection is not None:
            self.request.connection.close()  # type: ignore[attr-defined] # HTTP1Connection has it

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
        except RecursionError:
            raise invalid("The request body is nested too deeply", code="invalid_json") from None

    # -- output --------------------------------------------------------------------------------

    def send(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_text(json_text(body), status, headers)

    def send_text(self, text: str, status: int = 200, headers: dict[str, str] | None = None) -> None:
        """An answer whose JSON text is already made (a document encoded once and shared)."""
        self.set_status(status)
        for name, value in {**self.answer_headers, **(headers or {})}.items():
            self.set_header(name, value)
        self.finish(text)

    async def stream_bytes(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        """A large answer (a picture, or `start:end` of it) written a chunk at a time, each flushed
        before the next: a client that does not read holds one chunk of it, never a copy of the
        whole (the bytes are shared with every other client of the picture)."""
        end = len(data) if end is None else end
        self.set_header("Content-Length", end - start)
        view = memoryview(data)
        for offset in range(start, end, STREAM_CHUNK):
            self.write(bytes(view[offset:min(offset + STREAM_CHUNK, end)]))
            await self.within_write_timeout(self.flush())
        await self.finish()

    def picture_url(self, uuid: str, index: int, fmt: str, compression: int | None) -> str:
        """This gateway's URL of a task's picture in another format (the same ownership rules)."""
        query = "format=%s" % fmt + ("" if compression is None else "&compression=%d" % compression)
        return "%s/v1/images/%s/%d?%s" % (self.origin, uuid, index, query)

    @functools.cached_property
    def origin(self) -> str:
        """This gateway as the client reached it: public_url, else the request's scheme and host
        (X-Forwarded-Proto and X-Forwarded-Host believed from trusted_proxies only)."""
        headers, trusted = self.request.headers, self.gateway.settings.proxy_networks
        scheme, host = self.request.protocol, self.request.host
        if access.from_trusted_proxy(self.request.remote_ip, trusted):
            scheme = headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip().lower()
            host = headers.get("X-Forwarded-Host", host).split(",")[0].strip()
        return self.gateway.links.base(scheme, host)

    async def linker(self, fmt: str | None = None, compression: int | None = None) -> LinkMaker | None:
        """pictures=keep: the gateway's signed links to a task's kept pictures, at this request's
        origin. None with pictures=link: the provider's own links are the answer."""
        if self.gateway.keeper is None:
            return None
        await self.gateway.links.ready()
        return functools.partial(self.gateway.links.pictures, self.origin, fmt=fmt, compression=compression)

    async def shown(self, task: Task) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
        """A completed task's picture URLs as answers give them, and the provider's own links
        (source_urls) when those are not the answer."""
        links = await self.linker()
        if links is None:
            return task.image_urls, None
        # its batch size is in the record, not here: at most what any task may ask for
        return links(task.uuid, len(task.image_urls), self.gateway.settings.max_batch_size), task.image_urls

    def send_csv(self, text: str, filename: str) -> None:
        self.set_header("Content-Type", "text/csv; charset=UTF-8")
        self.set_header("Content-Disposition", 'attachment; filename="%s"' % filename)
        self.finish(text)

    def query_argument(self, name: str) -> str | None:
        return self.get_query_argument(name, None)

    def api_error(self, cause: BaseException | None, status_code: int = 500) -> ApiError:
        return statuses.api_error(cause, statuses.Context(
            self.request.method or "GET", self.request.path, self.gateway.settings.poll_interval,
            self.task_uuid, self.submitted, status_code, self._reason))

    @property
    def retry_after(self) -> str:
        return str(statuses.retry_seconds(self.gateway.settings.poll_interval))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error = self.api_error(exc, status_code)
        if self._prepared_future is not None and not self._prepared_future.done():
            # Refused before its body was read (401, 404, 405, 413, ...): Tornado closes the connection
            # after such an answer, so say so, or the client's next request meets a dead socket.
            error.headers["Connection"] = "close"
        if error.status in (400, 413) and self._body_size > self.gateway.settings.max_body_bytes:
            error.headers["Connection"] = "close"  # the rest of the body is not worth reading
        self.send(error.body(), error.status, error.headers)

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        if isinstance(value, StreamClosedError):
            log.info("%s %s (task %s): the client went away", self.request.method, self.request.path,
                     self.task_uuid or "-")
            return
        if not isinstance(value, statuses.EXPECTED):
            log.error("%s %s (task %s): unexpected error", self.request.method, self.request.path,
                      self.task_uuid or "-", exc_info=value)
            return
        self.log_error(self.api_error(value))

    def log_error(self, error: ApiError) -> None:
        caller = getattr(self, "caller", None)
        log.warning("%s %s (key %s, task %s) -> %d %s: %s", self.request.method, self.request.path,
                    caller.name if caller is not None else "-", self.task_uuid or "-", error.status,
                    error.code or error.type, error.message)

    # -- tasks ---------------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest, model: str, end_user: str | None = None,
                     webhook: WebhookRequest | None = None) -> Task:
        key = validation.idempotency_key(self.request.headers.get("Idempotency-Key"))
        try:
            retry = validation.retry_count(self.request.headers.get("x-stainless-retry-count")) >= 1
            submitted = await self.gateway.submit(request, self.caller, model, key, retry, end_user, webhook)
        except Refused as refused:
            self.answer_headers.update(access.rate_limit_headers(refused.admission))
            raise
        except NotRecorded as e:  # the task exists: the answer names it and says not to resubmit
            self.task_uuid, self.submitted = e.uuid, True
            raise
        self.answer_headers.update(access.rate_limit_headers(submitted.admission))
        self.task_uuid, self.submitted = submitted.task.uuid, True
        return submitted.task

    async def wait_for_task(self, budget: float | None = None,
                            on_tick: Callable[[Task | None], Awaitable[None]] | None = None) -> Outcome | None:
        """This request's task outcome from the shared engine; None when the client hung up.
        `on_tick` is called after every status read while the task runs (for streams)."""
        assert self.task_uuid is not None
        watcher, uuid, accounts = self.gateway.watcher, self.task_uuid, self.gateway.accounts
        try:
            accounts.enter_wait(self.caller)
        except TooManyCallerWaiters:
            await accounts.refused(self.caller, "too_many_waiters")
            raise
        try:
            self._waiting = waiting = watcher.wait(uuid, budget)
        except BaseException:
            accounts.leave_wait(self.caller)
            raise
        try:
            tick: asyncio.Future[Task | None] | None = None
            while on_tick is not None and not waiting.done():
                tick = tick or watcher.next_tick(uuid)
                # a heartbeat on its own timer: a long poll_interval must not leave a stream silent
                await asyncio.wait([waiting, tick], timeout=self.gateway.settings.stream_heartbeat,  # type: ignore[type-var]
                                   return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    break
                if tick.done():
                    read, tick = tick.result(), None
                    await on_tick(read)
                else:
                    await on_tick(None)  # nothing read since: a keep-alive
            return await waiting
        except (asyncio.CancelledError, StreamClosedError):
            waiting.cancel()
            return None  # the client left: nobody to answer
        finally:
            self._waiting = None
            accounts.leave_wait(self.caller)

    @staticmethod
    def pictures(outcome: Outcome) -> Task:
        """The completed task; any other outcome is raised as the error it means."""
        if outcome.state == COMPLETED and outcome.task is not None:
            return outcome.task
        raise statuses.OutcomeError(outcome)
