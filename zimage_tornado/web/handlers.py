"""The endpoints: each parses, calls one thing, renders. Shared behaviour is in web/base.py;
which status an error gets is web/statuses.py's; the routes are web/routes.py's."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any

from zimage_tornado import (SERVICE_NAME, __version__, frontends, images, logs, openai_api, openapi, reports,
                            validation, webhooks)
from zimage_tornado.domain import COMPLETED, FAILED, Task
from zimage_tornado.errors import ApiError
from zimage_tornado.images import FORMATS
from zimage_tornado.metrics import CONTENT_TYPE
from zimage_tornado.pictures import Sources
from zimage_tornado.store import utc_day
from zimage_tornado.watcher import INTERRUPTED, RUNNING, TIMEOUT, Outcome
from zimage_tornado.web.base import BaseHandler, json_text
from zimage_tornado.tenants import ANONYMOUS, Caller
from zimage_tornado.web import ranges, statuses
from zimage_tornado.upstream import UpstreamError
from zimage_tornado.web.events import CompletionStream, EventStream, TaskEvents
from zimage_tornado.web.statuses import OutcomeError

STATIC = Path(__file__).parent.parent / "static"
PLAYGROUND_PAGE = (STATIC / "playground.html").read_bytes()
ADMIN_PAGE = (STATIC / "admin.html").read_bytes()
ICON = (STATIC / "icon.svg").read_bytes()
# Images come from the upstream's image host, anywhere; everything else from here.
PAGE_POLICY = ("default-src 'self'; img-src 'self' http: https: data:; style-src 'unsafe-inline'; "
               "script-src 'unsafe-inline'; frame-ancestors 'none'")


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, "Unknown route: %s %s" % (self.request.method, self.request.path), code="unknown_route")


class InfoHandler(BaseHandler):
    def get(self) -> None:
        if self.request.headers.get("Accept", "").startswith("text/html"):  # a person: show the playground
            return self.redirect("/playground")
        self.send({
            "service": SERVICE_NAME,
            "version": __version__,
            "description": "OpenAI-compatible gateway for the Z-Image text-to-image service",
            # No upstream URL for visitors: operators read it in /health/ready.
            "demo": self.gateway.settings.demo,
            "playground": "/playground",
            "endpoints": [{"method": m, "path": p, "description": d} for m, p, d in self.settings["endpoints"]],
        })


class PageHandler(BaseHandler):
    """One self-contained page (no build step, no CDN): it works offline."""

    page = b""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Content-Security-Policy", PAGE_POLICY)
        self.finish(self.page)


class PlaygroundHandler(PageHandler):
    page = PLAYGROUND_PAGE


class AdminPageHandler(PageHandler):
    """Usage per key and recent tasks; the page asks for an admin key and calls /admin/*."""

    page = ADMIN_PAGE


class IconHandler(BaseHandler):
    """The pages' icon, for browsers and tools that ask for /favicon.ico (the pages carry it inline)."""

    def get(self) -> None:
        self.set_header("Content-Type", "image/svg+xml")
        self.set_header("Cache-Control", "public, max-age=86400")
        self.finish(ICON)


class AdminUsageHandler(BaseHandler):
    async def get(self) -> None:
        self.require_admin()
        today = utc_day(self.gateway.clock())
        since, until = validation.day_range(self.get_query_argument("since", None),
                                            self.get_query_argument("until", None), today)
        key = validation.key_name(self.get_query_argument("key", None))
        group_by = validation.choice(self.query_argument("group_by") or "key", "group_by", ("key", "end_user"))
        if group_by == "end_user":
            data = await self.gateway.store.end_user_usage(since, until, key)
        else:
            data = [row.as_dict() for row in await self.gateway.store.usage(since, until, key)]
        self.send({"object": "list", "since": since, "until": until, "group_by": group_by, "data": data})


class AdminTasksHandler(BaseHandler):
    async def get(self) -> None:
        self.require_admin()
        query = reports.task_query(self.query_argument)
        self.send(reports.task_page(await self.gateway.store.find_tasks(query), query, await self.linker()))


class AdminKeysHandler(BaseHandler):
    async def get(self) -> None:
        self.require_admin()
        summaries = await reports.key_summaries(self.gateway.keys, self.gateway.store, utc_day(self.gateway.clock()))
        self.send({"object": "list", "data": summaries})


class AdminPicturesHandler(BaseHandler):
    def get(self) -> None:
        self.require_admin()
        keeper = self.gateway.keeper
        if keeper is None:
            return self.send({"object": "picture_store", "mode": "link"})
        self.send({"object": "picture_store", "mode": "keep", "store": keeper.shelf.backend.describe(),
                   **keeper.shelf.usage(), "failed": keeper.failed})


class AdminUsageCsvHandler(BaseHandler):
    async def get(self) -> None:
        self.require_admin()
        since, until = validation.day_range(self.query_argument("since"), self.query_argument("until"),
                                            utc_day(self.gateway.clock()))
        rows = await self.gateway.store.usage(since, until, validation.key_name(self.query_argument("key")))
        self.send_csv(reports.usage_csv(rows), "usage-%s-%s.csv" % (since, until))


class AdminTasksCsvHandler(BaseHandler):
    async def get(self) -> None:
        self.require_admin()
        query = reports.task_query(self.query_argument, high=reports.MAX_CSV_ROWS)
        self.send_csv(reports.tasks_csv(await self.gateway.store.find_tasks(query)), "tasks.csv")


class AdminWebhooksHandler(BaseHandler):
    async def get(self) -> None:
        self.require_admin()
        self.send(await reports.webhook_page(self.gateway.store, self.query_argument, admin=True))


class AdminWebhookRetryHandler(BaseHandler):
    async def post(self, message_id: str) -> None:
        self.require_admin()
        message = await self.gateway.webhooks.retry(validation.message_id(message_id))
        if message is None:
            raise ApiError(404, "Webhook message %s was not found" % message_id, code="webhook_not_found")
        self.send(webhooks.message_object(message, admin=True), 202)


class WebhooksHandler(BaseHandler):
    async def get(self) -> None:
        await self.read_allowed()
        self.send(await reports.webhook_page(self.gateway.store, self.query_argument, key=self.caller.name))


class HealthHandler(BaseHandler):
    open_during_shutdown = True

    def get(self) -> None:
        # Liveness only: it must stay cheap and never touch the upstream.
        self.send({"status": "ok", "service": SERVICE_NAME, "version": __version__,
                   "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid()})


class ReadinessHandler(BaseHandler):
    """Ready unless shutting down; says whether the upstream answered lately, from what the
    gateway's own traffic saw (it never polls the upstream for this)."""

    open_during_shutdown = True

    async def get(self) -> None:
        gateway, now = self.gateway, time.monotonic()
        store_problem = await gateway.store.healthy()
        upstream = gateway.upstream
        window = max(60.0, 3 * gateway.settings.poll_interval)
        answered_ago = None if upstream.last_answer_at is None else round(now - upstream.last_answer_at, 3)
        failure = None
        if upstream.last_failure is not None:
            failure = {"seconds_ago": round(now - upstream.last_failure[0], 3), "error": upstream.last_failure[1]}
        checked = upstream.checked_until > now  # out after a browser check: no submit can succeed now
        status = ("shutting_down" if gateway.shutting_down else "store_unavailable" if store_problem
                  else "upstream_auth_required" if checked else "ready")
        self.send({
            "status": status,
            "upstream": {
                "url": logs.redact_url(gateway.settings.upstream_url),
                "answered_recently": answered_ago is not None and answered_ago <= window,
                "last_answer_seconds_ago": answered_ago,
                "last_failure": failure,
                "auth_required_for_seconds": round(upstream.checked_until - now) if checked else None,
            },
            "store": {"kind": gateway.store.name, "ok": store_problem is None, "error": store_problem},
            "waiters": gateway.watcher.waiting,
            "polling_loops": gateway.watcher.active_polls,
            "requests_in_flight": len(gateway.active) - 1,  # not counting this one
        }, 503 if gateway.shutting_down or store_problem or checked else 200)


@functools.lru_cache(maxsize=4)
def document_text(endpoints: tuple[tuple[str, str, str], ...]) -> str:
    """/openapi.json is built and encoded once per endpoint table: a client asking for it again
    and again (a pipeline of hundreds) costs a write each, not a rebuild of ~100 KB of JSON."""
    return json_text(openapi.document(endpoints))


class OpenApiHandler(BaseHandler):
    open_during_shutdown = True

    def get(self) -> None:
        self.send_text(document_text(self.settings["endpoints"]))


class MetricsHandler(BaseHandler):
    open_during_shutdown = True

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.gateway.metrics.render())


class ChatCompletionsHandler(BaseHandler):
    parse = staticmethod(openai_api.parse_chat_request)

    async def post(self) -> None:
        request = self.parse(self.json_body(), self.gateway.settings.limits, self.gateway.models)
        prefer = None if request.stream else self.prefer_wait()
        wait = prefer is not None or (self.gateway.settings.chat_wait if request.wait is None else request.wait)
        if request.canned is not None:  # a front-end's housekeeping or follow-up: no job, whatever the mode
            return await self.reply(request, None, request.canned)
        if request.tool_call is not None:  # the front-end's image tool makes the picture
            return await self.call_tool(request, request.tool_call)
        task = await self.submit(request.generation, request.model, request.end_user, request.webhook)
        if not wait:
            return await self.reply(request, task.uuid, task.uuid)
        if request.stream:
            return await self.stream_pictures(request)
        outcome = await self.wait_for_task(prefer)
        if outcome is None:
            return
        if prefer is not None and outcome.state == TIMEOUT:
            return self.accepted(outcome, prefer)
        urls, _ = await self.shown(self.pictures(outcome))
        await self.reply(request, task.uuid, openai_api.markdown_images(urls))

    async def reply(self, request: openai_api.ChatRequest, task_uuid: str | None, content: str) -> None:
        if not request.stream:
            render = openai_api.text_completion if request.text else openai_api.chat_completion
            return self.send(render(request.model, task_uuid, content))
        stream = CompletionStream(self, request, task_uuid)
        await stream.begin()
        await stream.say(content)
        await stream.end()

    async def call_tool(self, request: openai_api.ChatRequest, call: frontends.ToolCall) -> None:
        if not request.stream:
            return self.send(openai_api.tool_call_completion(request.model, call))
        stream = CompletionStream(self, request, None)
        await stream.begin()
        await stream.delta({"tool_calls": [call.as_dict(index=0)]})
        await stream.delta({}, "tool_calls")
        await stream.end(stop=False)

    async def stream_pictures(self, request: openai_api.ChatRequest) -> None:
        """Wait mode, streamed: progress lines while the task runs, then the pictures (or the
        error, as an event: the 200 status is already sent)."""
        stream = CompletionStream(self, request, self.task_uuid, self.gateway.settings.chat_progress)
        await stream.begin()
        outcome = await self.wait_for_task(on_tick=stream.progress)
        if outcome is None:
            return
        if outcome.state == INTERRUPTED:  # shutting down: end the stream with where the task stands
            status = outcome.task.status if outcome.task else "submitted"
            await stream.say(openai_api.restart_note(outcome.uuid, status))
            return await stream.end()
        try:
            done = self.pictures(outcome)
        except OutcomeError as e:  # mapped like any error, but told as an event
            error = self.api_error(e)
            self.log_error(error)
            await stream.error(error)
            return await stream.end(stop=False)
        separator = "\n" if stream.progress_in_content else ""
        urls, _ = await self.shown(done)
        await stream.say(separator + openai_api.markdown_images(urls))
        await stream.end()


class CompletionsHandler(ChatCompletionsHandler):
    """Legacy `POST /v1/completions`: the same job as chat, answered as text completions."""

    parse = staticmethod(openai_api.parse_completion_request)


class UnsupportedHandler(BaseHandler):
    """OpenAI endpoints this gateway does not offer: a 404 that says so, whatever the method."""

    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, "This gateway generates images from text only: %s is not offered" % self.route,
                       code="unsupported_endpoint")


class ImagesAnswering(BaseHandler):
    async def images_answer(self, done: Task, request: openai_api.ImagesRequest) -> dict[str, Any]:
        """A completed task as `client.images.generate(...)` reads it: URLs (the gateway's signed
        links with pictures=keep) or base64, in the format asked for."""
        b64, urls = None, done.image_urls
        fmt, compression = request.output_format, request.output_compression
        links = await self.linker(None if fmt == "png" else fmt, compression)
        if request.response_format == "b64_json":
            b64 = await self.gateway.images.b64(done, request.generation.batch_size, fmt, compression)
        elif links is not None:
            urls = links(done.uuid, len(urls), request.generation.batch_size)
        elif fmt != "png":  # the image host has PNGs: the gateway's own picture URLs convert
            urls = tuple(self.picture_url(done.uuid, i, fmt, compression) for i in range(len(urls)))
        return openai_api.images_response(urls, b64, request=request)


class ImagesGenerationsHandler(ImagesAnswering):
    """What `client.images.generate(...)` sends: submit, wait for the pictures, answer them."""

    async def post(self) -> None:
        request = openai_api.parse_images_request(self.json_body(), self.gateway.settings.limits, self.gateway.models)
        prefer = None if request.stream else self.prefer_wait()
        await self.submit(request.generation, request.model, request.end_user, request.webhook)
        if request.stream:
            return await self.stream_images(request)
        outcome = await self.wait_for_task(prefer)
        if outcome is None:
            return
        if prefer is not None and outcome.state == TIMEOUT:  # collected later at the same answer's URL
            return self.accepted(outcome, prefer, "/v1/images/generations/%s" % outcome.uuid)
        self.send(await self.images_answer(self.pictures(outcome), request))


    async def stream_images(self, request: openai_api.ImagesRequest) -> None:
        """stream=true: a comment after every status read while the task runs (proxies and SDK
        timeouts see a live stream), then one image_generation.completed event per picture. The
        upstream sends no partial pictures, so partial_images sends none."""
        stream = EventStream(self)
        stream.start()
        await stream.keepalive()
        outcome = await self.wait_for_task(on_tick=lambda _: stream.keepalive())
        if outcome is None:
            return
        try:
            done = self.pictures(outcome)
            pictures = await self.gateway.images.b64(done, request.generation.batch_size, request.output_format,
                                                     request.output_compression)
        except (statuses.OutcomeError, UpstreamError) as e:  # the 200 is sent: the error is an event
            error = self.api_error(e)
            self.log_error(error)
            await stream.named("error", {"type": "error", "error": error.body()["error"]})
            self.finish()
            return
        usage = openai_api.image_usage(dataclasses.replace(request, generation=dataclasses.replace(
            request.generation, batch_size=1)))
        for b64 in pictures:
            await stream.named("image_generation.completed", openai_api.image_completed_event(request, b64, usage))
        self.finish()


class ImagesResultHandler(ImagesAnswering):
    """`GET /v1/images/generations/{uuid}`: a handed-off task's answer, as the POST would have
    given it (202 with the task while it runs)."""

    async def get(self, uuid: str) -> None:
        self.task_uuid = validation.task_id(uuid)
        await self.read_allowed()
        await self.require_readable(self.task_uuid)
        record = await self.gateway.store.get_task(self.task_uuid)
        if record is None:
            raise ApiError(404, "Task %s was not found" % self.task_uuid, code="task_not_found")
        request = openai_api.parse_images_result(self.query_argument, record)
        task = await self.gateway.watcher.peek(self.task_uuid)
        if not task.is_final:
            return self.send(openai_api.task_pending(task, task.uuid), 202, {"Retry-After": self.retry_after})
        self.send(await self.images_answer(self.pictures(Outcome(task.status, task.uuid, task)), request))


# Who loads a picture by its signed link: nobody in particular (no key, no limits of a key).
ANONYMOUS_CALLER = Caller(ANONYMOUS, "signed-link")


class PictureHandler(BaseHandler):
    """One picture of a finished task, from this origin. pictures=keep: from the picture store,
    to anyone holding a signed link (no key needed: an <img>, a chat front-end, a webhook
    receiver), else under the owner rules; pictures=link: fetched from the provider, for a page
    that downloads it (a `download` link to another origin is ignored by browsers)."""

    signed = False  # this request carries a valid link signature
    signed_for = 0  # seconds the link has left

    async def prepare(self) -> None:  # type: ignore[override] # Tornado awaits a coroutine prepare()
        if self.query_argument("signature") is not None:
            await self.gateway.links.ready()  # the secret, from the store on the first link checked
        super().prepare()

    def identify(self) -> Caller:
        expires, signature = self.query_argument("expires"), self.query_argument("signature")
        if expires is None and signature is None:
            return super().identify()
        self.signed_for = self.gateway.links.check(self.request.path, expires or "", signature or "")
        self.signed = True
        self.caller = ANONYMOUS_CALLER
        return self.caller

    async def get(self, uuid: str, index: str) -> None:
        self.task_uuid = validation.task_id(uuid)
        number = validation.picture_index(index)
        fmt = self.query_argument("format")
        fmt = None if fmt is None else validation.choice(fmt, "format", tuple(FORMATS))
        compression = self.query_argument("compression")
        quality = None if compression is None else validation.integer(
            validation.whole_number(compression, 3), "compression", 0, 100)
        if not self.signed:
            await self.read_allowed()
            await self.require_readable(self.task_uuid)
        keeper = self.gateway.keeper
        if keeper is None:
            return await self.send_picture(*await self.from_source(number, fmt or "png", quality))
        manifest = await keeper.manifest(self.task_uuid, functools.partial(self.completed_urls, number))
        if number >= len(manifest.pictures):
            raise self.no_picture(number, "completed")
        kept = manifest.pictures[number]
        if fmt is None or FORMATS[fmt] == kept.media_type:
            data, kind, tag = await keeper.read(manifest, number), kept.media_type, kept.sha256
        else:
            task = await self.gateway.watcher.peek(self.task_uuid)
            data, kind = await self.gateway.images.picture(task, number, fmt, quality)
            tag = "%s-%s-%s" % (kept.sha256, fmt, images.quality_level(quality))
        await self.send_picture(data, kind, tag)

    async def completed_task(self, number: int) -> Task:
        """The task, completed with a picture `number`; else a 404 saying how it stands."""
        assert self.task_uuid is not None
        task = await self.gateway.watcher.peek(self.task_uuid)
        if task.status != COMPLETED or number >= len(task.image_urls):
            raise self.no_picture(number, task.status)
        return task

    async def completed_urls(self, number: int) -> Sources:
        return await self.gateway.picture_sources(await self.completed_task(number))

    def no_picture(self, number: int, status: str) -> ApiError:
        return ApiError(404, "Task %s has no picture %d (it is %s)" % (self.task_uuid, number, status),
                        param="index", code="picture_not_found")

    async def from_source(self, number: int, fmt: str, quality: int | None) -> tuple[bytes, str, str | None]:
        task = await self.completed_task(number)
        data, kind = await self.gateway.images.picture(task, number, fmt, quality)
        return data, kind, None

    async def send_picture(self, data: bytes, kind: str, tag: str | None) -> None:
        self.set_header("Content-Type", kind)
        self.set_header("Content-Disposition", 'attachment; filename="%s_%s.%s"' % (
            self.task_uuid, self.path_args[1], kind.rpartition("/")[2]))
        if self.signed:  # the link names one picture that never changes: cached until the link ends
            self.set_header("Cache-Control", "public, max-age=%d, immutable" % self.signed_for)
        else:
            self.set_header("Cache-Control", "private, max-age=3600")
        if tag is not None:
            self.set_header("ETag", '"%s"' % tag)
            self.set_header("Accept-Ranges", "bytes")
            if self.check_etag_header():
                self.set_status(304)
                return await self.finish()
            part = ranges.requested(self.request.headers.get("Range"), len(data))
            if part is not None:
                start, end = part
                self.set_status(206)
                self.set_header("Content-Range", "bytes %d-%d/%d" % (start, end - 1, len(data)))
                return await self.stream_bytes(data, start, end)
        await self.stream_bytes(data)


class ModelsHandler(BaseHandler):
    def get(self) -> None:
        self.send(openai_api.model_list(self.gateway.models.names))


class ModelHandler(BaseHandler):
    def get(self, model_id: str) -> None:
        if not self.gateway.models.knows(model_id):
            raise ApiError(404, "The model %r does not exist" % model_id[:200], param="model", code="model_not_found")
        self.send(openai_api.model_object(model_id))


class TaskListHandler(BaseHandler):
    """The caller's own tasks from the store (admins: anyone's with ?key=), newest first."""

    async def get(self) -> None:
        await self.read_allowed()
        owner = None if self.caller.admin else self.caller.name
        records, has_more = await reports.own_tasks(self.gateway.store, self.query_argument, owner)
        self.send(openai_api.task_list(records, has_more, await self.linker()))


class TaskEventsHandler(BaseHandler):
    """One task's progress as server-sent events, for a browser or a tool, until it ends."""

    async def get(self, uuid: str) -> None:
        self.task_uuid = validation.task_id(uuid)
        await self.read_allowed()
        await self.require_readable(self.task_uuid)
        await self.gateway.watcher.peek(self.task_uuid)  # an unknown task is a 404 before the stream's 200
        stream = TaskEvents(self)
        stream.start()
        await stream.keepalive()  # the headers go now: a client knows it is connected
        settings = self.gateway.settings
        outcome = await self.wait_for_task(max(settings.wait_budget, settings.follow_budget), on_tick=stream.progress)
        if outcome is None:
            return
        if outcome.state in (COMPLETED, FAILED):
            assert outcome.task is not None
            shown = await self.shown(outcome.task)
            return await stream.end(outcome.state, openai_api.images_ready(outcome.task, *shown))
        if outcome.state == TIMEOUT:
            return await stream.end("expired", {"uuid": outcome.uuid, "status": "expired"})
        error = self.api_error(statuses.OutcomeError(outcome))
        await stream.end("error", error.body())


class TaskHandler(BaseHandler):
    async def get(self, uuid: str) -> None:
        self.task_uuid = validation.task_id(uuid)
        await self.read_allowed()
        await self.require_readable(self.task_uuid)
        task = await self.gateway.watcher.peek(self.task_uuid)
        self.send(task.document)  # passed through as the upstream sent it


class ImagesHandler(BaseHandler):
    """The long-poll: answers when the task finishes or this request's budget runs out."""

    async def get(self, uuid: str) -> None:
        self.task_uuid = validation.task_id(uuid)
        await self.read_allowed()  # a wait counts once, when it starts
        await self.require_readable(self.task_uuid)
        budget = validation.wait_budget(self.get_query_argument("timeout", None),
                                        self.get_query_argument("wait", None), self.gateway.settings.wait_budget)
        outcome = await (self.peek_outcome() if budget <= 0 else self.wait_for_task(budget))
        if outcome is None:
            return
        if outcome.state in (RUNNING, INTERRUPTED):  # asked not to wait, or shutting down
            body: dict[str, Any] = (openai_api.task_progress(outcome.task) if outcome.task
                                    else {"uuid": outcome.uuid, "status": "unknown"})
            return self.send(body, 202, {"Retry-After": self.retry_after})
        done = self.pictures(outcome)
        self.send(openai_api.images_ready(done, *await self.shown(done)))

    async def peek_outcome(self) -> Outcome:
        assert self.task_uuid is not None
        task = await self.gateway.watcher.peek(self.task_uuid)
        return Outcome(task.status if task.is_final else RUNNING, task.uuid, task)
