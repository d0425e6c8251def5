"""Idempotency-Key support: the same key, from the same caller, within idempotency_ttl returns
the same task.

The OpenAI SDK resubmits a whole request on timeouts and 5xx; a key lets a client retry without
paying for a second generation. The store is the truth (it outlives a restart, and with Redis
it is shared by every instance): a submit first claims its key there, so that exactly one
request anywhere submits; requests in this process with the same key share that one submission,
and those elsewhere wait for the claim to be fulfilled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from typing import Awaitable, Callable

from zimage_tornado.cache import ResultCache
from zimage_tornado.domain import PENDING, GenerationRequest, Task
from zimage_tornado.errors import ApiError, invalid
from zimage_tornado.store import Store


def fingerprint(request: GenerationRequest) -> str:
    """The validated request as canonical JSON: what was asked, not how it was spelled."""
    canonical = json.dumps(dataclasses.asdict(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, store: Store, *, ttl: float, claim_ttl: float, clock: Callable[[], float],
                 retry_window: float = 300.0, remembered: int = 10000) -> None:
        self.store = store
        # SDK retries (x-stainless-retry-count) without a key: the caller's identical recent task,
        # by (scope, the validated request itself): a frozen dataclass hashes in a microsecond
        self._recent: ResultCache[Task, tuple[str, GenerationRequest]] = ResultCache(remembered, retry_window)
        self.ttl = ttl
        self.claim_ttl = claim_ttl  # a claim whose submit never ended (its process died) expires
        self.clock = clock
        self._pending: dict[str, tuple[str, asyncio.Future[Task]]] = {}
        self.replays = 0

    async def submit(self, scope: str, key: str, request: GenerationRequest,
                     submit: Callable[[GenerationRequest], Awaitable[Task]]) -> Task:
        """`key` as sent by the caller whose `scope` (tenants.Caller) is given: one caller's keys
        never meet another's, so they can neither collide nor be probed."""
        digest = fingerprint(request)
        scoped = "%s %s" % (scope, key)
        pending = self._pending.get(scoped)
        if pending is not None:
            self._check(key, pending[0], digest)
            self.replays += 1
            return await asyncio.shield(pending[1])
        future = asyncio.ensure_future(self._claimed(scope, key, digest, request, submit))
        self._pending[scoped] = (digest, future)
        try:
            return await asyncio.shield(future)
        finally:
            self._pending.pop(scoped, None)

    async def _claimed(self, scope: str, key: str, digest: str, request: GenerationRequest,
                       submit: Callable[[GenerationRequest], Awaitable[Task]]) -> Task:
        deadline = self.clock() + self.claim_ttl
        while True:
            claim = await self.store.claim(scope, key, digest, self.claim_ttl, self.clock())
            if claim.mine:
                break
            self._check(key, claim.digest, digest)
            if claim.uuid is not None:
                self.replays += 1
                return Task(claim.uuid, PENDING)
            if self.clock() > deadline:  # cannot be: an unfulfilled claim expires by then
                raise ApiError(409, "Idempotency-Key %r: its first request is still being submitted" % key,
                               param="Idempotency-Key", code="idempotency_key_in_use")
            await asyncio.sleep(0.05)  # another process is submitting it: its answer comes soon
        try:
            task = await submit(request)
        except BaseException:
            await self.store.release(scope, key)  # a failed submit may be retried with the key
            raise
        await self.store.fulfil(scope, key, task.uuid, self.ttl, self.clock())
        return task

    def remember(self, scope: str, request: GenerationRequest, task: Task) -> None:
        """A task made without a key, for an SDK's retry of the same request."""
        self._recent.put((scope, request), task)

    def retried(self, scope: str, request: GenerationRequest) -> Task | None:
        """The task this caller made for the same request within the retry window, if any."""
        task = self._recent.get((scope, request))
        if task is not None:
            self.replays += 1
        return task

    @staticmethod
    def _check(key: str, stored: str, given: str) -> None:
        if stored != given:
            raise invalid("Idempotency-Key %r was already used for a different request" % key,
                          param="Idempotency-Key", code="idempotency_key_reused")
