"""Idempotency-Key support: the same key within the window returns the same task.

The OpenAI SDK resubmits a whole request on timeouts and 5xx; a key lets a client retry without
paying for a second generation. Concurrent requests with one key share a single submission.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Awaitable, Callable

from zimage_tornado.cache import ResultCache
from zimage_tornado.domain import GenerationRequest, Task
from zimage_tornado.errors import invalid


def fingerprint(request: GenerationRequest) -> str:
    return hashlib.sha256(repr(request).encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, ttl: float, max_entries: int) -> None:
        self._done: ResultCache[tuple[str, Task]] = ResultCache(max_entries, ttl)
        self._pending: dict[str, tuple[str, asyncio.Future[Task]]] = {}
        self.replays = 0

    async def submit(self, key: str, request: GenerationRequest,
                     submit: Callable[[GenerationRequest], Awaitable[Task]]) -> Task:
        digest = fingerprint(request)
        done = self._done.get(key)
        if done is not None:
            self._check(key, done[0], digest)
            self.replays += 1
            return done[1]
        pending = self._pending.get(key)
        if pending is not None:
            self._check(key, pending[0], digest)
            self.replays += 1
            return await asyncio.shield(pending[1])
        future = asyncio.ensure_future(submit(request))
        self._pending[key] = (digest, future)
        try:
            task = await asyncio.shield(future)
        finally:
            self._pending.pop(key, None)
        self._done.put(key, (digest, task))  # only accepted submissions: a failed one may be retried
        return task

    @staticmethod
    def _check(key: str, stored: str, given: str) -> None:
        if stored != given:
            raise invalid("Idempotency-Key %r was already used for a different request" % key,
                          param="Idempotency-Key", code="idempotency_key_reused")
