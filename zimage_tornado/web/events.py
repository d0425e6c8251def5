"""Server-Sent Events: the framing of a text/event-stream answer, and chat streams built on it."""

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
        self.handler.set_header("Content-Type", "text/event-stream; charset=UTF-8")
        self.handler.set_header("Cache-Control", "no-cache")
        self.handler.set_header("X-Accel-Buffering", "no")  # nginx: pass events on as they come

    async def event(self, data: Any) -> None:
        await self._emit("data: %s\n\n" % (data if isinstance(data, str) else json_text(data)))

    async def keepalive(self) -> None:
        await self._emit(": waiting\n\n")  # an SSE comment: keeps idle-timeout proxies from cutting us

    async def error(self, error: ApiError) -> None:
        await self.event({"error": envelope(error.message, error.type, error.param, error.code)})

    async def _emit(self, text: str) -> None:
        self.handler.write(text)
        await self.handler.within_write_timeout(self.handler.flush())


class ChatStream(EventStream):
    """A chat completion as `chat.completion.chunk` events ending with `data: [DONE]`."""

    def __init__(self, handler: BaseHandler, model: str, completion: str, task_uuid: str | None) -> None:
        super().__init__(handler)
        self.model, self.completion, self.task_uuid = model, completion, task_uuid
        self._last: tuple[Any, ...] | None = None  # the task state last reported

    async def begin(self) -> None:
        self.start()
        await self.delta({"role": "assistant", "content": ""})

    async def delta(self, delta: dict[str, Any], finish: str | None = None) -> None:
        chunk = openai_api.chat_chunk(self.completion, self.model, delta, finish)
        if self.task_uuid:
            chunk["task_uuid"] = self.task_uuid
        await self.event(chunk)

    async def say(self, content: str) -> None:
        await self.delta({"content": content})

    async def progress(self, task: Task | None) -> None:
        """A line when the task's state changed since the last one, a keep-alive otherwise."""
        state = None if task is None else (task.status, task.progress, task.queue_position)
        if task is not None and state != self._last:
            self._last = state
            await self.say(openai_api.progress_line(task))
        else:
            await self.keepalive()

    @property
    def reported_progress(self) -> bool:
        return self._last is not None

    async def end(self, stop: bool = True) -> None:
        if stop:
            await self.delta({}, "stop")
        await self.event("[DONE]")
        self.handler.finish()
