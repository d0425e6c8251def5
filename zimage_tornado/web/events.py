"""Server-Sent Events: the framing of a text/event-stream answer, and completion streams built on it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zimage_tornado import openai_api
from zimage_tornado.domain import Task
from zimage_tornado.errors import ApiError, envelope
from zimage_tornado.web.base import json_text

if TYPE_CHECKING:
    from zimage_tornado.web.base import BaseHandler  # noqa: F401 - a name for the annotations


class EventStream:
    """Writes events to one handler's client; every write is bounded by write_timeout."""

    def __init__(self, handler: BaseHandler) -> None:
        self.handler = handler

    def start(self) -> None:
        self.handler.streaming = True
        self.handler.set_header("Content-Type", "text/event-stream; charset=UTF-8")
        self.handler.set_header("Cache-Control", "no-cache")
        self.handler.set_header("X-Accel-Buffering", "no")  # nginx: pass events on as they come

    async def event(self, data: Any) -> None:
        await self._emit("data: %s\n\n" % (data if isinstance(data, str) else json_text(data)))

    async def keepalive(self) -> None:
        await self._emit(": waiting\n\n")  # an SSE comment: keeps idle-timeout proxies from cutting us

    async def named(self, name: str, data: Any) -> None:
        await self._emit("event: %s\ndata: %s\n\n" % (name, json_text(data)))

    async def error(self, error: ApiError) -> None:
        await self.event({"error": envelope(error.message, error.type, error.param, error.code)})

    async def _emit(self, text: str) -> None:
        self.handler.write(text)
        await self.handler.within_write_timeout(self.handler.flush())


class TaskEvents(EventStream):
    """One task's life as named events: `progress` when its status or progress changes (a comment
    after every other read, so proxies keep the stream open), then `completed`, `failed` or
    `expired` with the task, or `error`."""

    def __init__(self, handler: BaseHandler) -> None:
        super().__init__(handler)
        self._last: tuple[Any, ...] | None = None

    async def progress(self, task: Task | None) -> None:
        state = None if task is None else (task.status, task.progress, task.queue_position)
        if task is not None and state != self._last:
            self._last = state
            await self.named("progress", {"id": task.uuid, "status": task.status, "progress": task.progress,
                                          "queue_position": task.queue_position})
        else:
            await self.keepalive()

    async def end(self, name: str, data: Any) -> None:
        await self.named(name, data)
        self.handler.finish()


class CompletionStream(EventStream):
    """A chat completion as `chat.completion.chunk` events (or a legacy completion as
    `text_completion` ones) ending with `data: [DONE]`; with stream_options.include_usage, a
    last chunk with `choices: []` and the usage comes before it."""

    def __init__(self, handler: BaseHandler, request: openai_api.ChatRequest, task_uuid: str | None,
                 progress_to: str = "content") -> None:
        super().__init__(handler)
        self.request, self.task_uuid = request, task_uuid
        # where progress lines go (chat_progress): reasoning_content is shown apart by chat front-ends
        # and left out of the answer; a text completion has no such field
        self.progress_to = "content" if request.text else progress_to
        self.completion = openai_api.completion_id(task_uuid, request.text)
        self._last: tuple[Any, ...] | None = None  # the task state last reported

    async def begin(self) -> None:
        self.start()
        if not self.request.text:
            await self.delta({"role": "assistant", "content": ""})

    async def delta(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
        if self.request.text:
            chunk = openai_api.text_chunk(self.completion, self.request.model, delta.get("content", ""), finish)
        else:
            chunk = openai_api.chat_chunk(self.completion, self.request.model, delta, finish)
        if self.task_uuid:
            chunk["task_uuid"] = self.task_uuid
        await self.event({**chunk, **extra})

    async def say(self, content: str) -> None:
        await self.delta({"content": content})

    async def progress(self, task: Task | None) -> None:
        """A line when the task's state changed since the last one, a keep-alive otherwise."""
        state = None if task is None else (task.status, task.progress, task.queue_position)
        if task is not None and state != self._last:
            self._last = state
            # beside the line for people, the same for programs (the zimage client's progress bar)
            status = {"status": task.status, "progress": task.progress, "queue_position": task.queue_position}
            line = openai_api.progress_line(task)
            delta = {} if self.progress_to == "none" else {
                "reasoning_content" if self.progress_to == "reasoning" else "content": line}
            await self.delta(delta, task_status=status)
        else:
            await self.keepalive()

    @property
    def progress_in_content(self) -> bool:
        """Progress lines went into the answer's content: the pictures start on a line of their own."""
        return self._last is not None and self.progress_to == "content"

    async def end(self, stop: bool = True) -> None:
        if stop:
            await self.delta({}, "stop")
        if self.request.include_usage:
            await self.event(openai_api.usage_chunk(self.completion, self.request.model, self.request.text))
        await self.event("[DONE]")
        self.handler.finish()
