"""Idempotency-Key support: the same key within the window returns the same task.

The OpenAI SDK resubmits a whole request on timeouts and 5xx; a key lets a client retry without
paying for a second generation. Concurrent requests with one key share a single submission.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from typing import Awaitable, Callable

from zimage_tornado.cache import ResultCache
from zimage_tornado.domain import GenerationRequest, Task
from zimage_tornado.errors import invalid


def fingerprint(request: GenerationRequest) -> str:
    """The validated request as canonical JSON: what was asked, not how it was spelled."""
    canonical = json.dumps(dataclasses.asdict(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, ttl: float, max_entries: int) -> None:
        self._done: ResultCache[tuple[str, Task]] = ResultCache(max_entries, ttl)
        self._pending: dict[str, tuple[str, asyncio.Future[Task]]] = {}
        self.replays = 0

    async def submit(self, scope: str, key: str, request: GenerationRequest,
                     submit: Callable[[GenerationRequest], Awaitable[Task]]) -> Task:
        """`key` as sent by the caller whose `scope` (web/access.py) is given: one caller's keys
        never meet another's, so they can neither collide nor be probed."""
        digest = fingerprint(request)
        scoped = "%s %s" % (scope, key)
        done = self._done.get(scoped)
        if done is not None:
            self._check(key, done[0], digest)
            self.replays += 1
            return done[1]
        pending = self._pending.get(scoped)
        if pending is not None:
            self._check(key, pending[0], digest)
            self.replays += 1
            return await asyncio.shield(pending[1])
        future = asyncio.ensure_future(submit(request))
        self._pending[scoped] = (digest, future)
        try:
            task = await asyncio.shield(future)
        finally:
            self._pending.pop(scoped, None)
        self._done.put(scoped, (digest, task))  # only accepted submissions: a failed one may be retried
        return task

    @staticmethod
    def _check(key: str, stored: str, given: str) -> None:
        if stored != given:
            raise invalid("Idempotency-Key %r was already used for a different request" % key,
                          param="Idempotency-Key", code="idempotency_key_reused")
