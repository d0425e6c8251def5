"""Idempotency-Key support: the same key, from the same caller, within idempotency_ttl returns
the same task.

The OpenAI SDK resubmits a whole request on timeouts and 5xx; a key lets a client retry without
paying for a second generation. A key stays bound to its first attempt until idempotency_ttl:
its task, or, when that attempt's upstream outcome is unknown (the job may exist), that answer
again (as Stripe replays a key whose first attempt failed). An attempt that a crash interrupted
(its claim holds neither task nor outcome, and its process is gone or no submit can still be
running) is such an unknown outcome, never run again. Only a definite failure (nothing
was created) frees the key for another try. The store is the truth (it outlives a restart, and with Redis
it is shared by every instance): a submit first claims its key there, so that exactly one
request anywhere submits; requests in this process with the same key share that one submission,
and those elsewhere wait for the claim to be fulfilled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import uuid as uuidlib
from typing import Awaitable, Callable

from zimage_tornado.cache import ResultCache
from zimage_tornado.domain import PENDING, GenerationRequest, Task
from zimage_tornado.errors import ApiError, invalid
from zimage_tornado.store import Claim, NotRecorded, Store, StoreUnavailable
from zimage_tornado.upstream import UpstreamOutcomeUnknown

log = logging.getLogger("zimage_tornado.idempotency")


def fingerprint(request: GenerationRequest) -> str:
    """The validated request as canonical JSON: what was asked, not how it was spelled."""
    canonical = json.dumps(dataclasses.asdict(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, store: Store, *, ttl: float, claim_ttl: float, clock: Callable[[], float],
                 retry_window: float = 300.0, remembered: int = 10000, sole: bool = False) -> None:
        self.store = store
        # SDK retries (x-stainless-retry-count) without a key: the caller's identical recent task,
        # by (scope, the validated request itself): a frozen dataclass hashes in a microsecond
        # (an unknown outcome is remembered too: the retry gets it again, never a second job)
        self._recent: ResultCache[Task | UpstreamOutcomeUnknown, tuple[str, GenerationRequest]] = ResultCache(
            remembered, retry_window)
        self.ttl = ttl
        self.claim_ttl = claim_ttl  # no submit runs longer: a claim older than this, still unended, was interrupted
        self.boot = uuidlib.uuid4().hex  # this process's claims are known by it
        self.sole = sole  # no other process uses the store: a claim of another boot was left by a crash
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
            claim = await self.store.claim(scope, key, digest, self.ttl, self.clock(), self.boot)
            if claim.mine:
                break
            self._check(key, claim.digest, digest)
            if claim.uuid is not None:
                self.replays += 1
                return Task(claim.uuid, PENDING)
            if claim.failure is None and self._interrupted(claim):
                # its process died mid-submit: the job may exist, and this key stays bound to that
                await self._bind(scope, key, None, UpstreamOutcomeUnknown.code)
                self.replays += 1
                raise UpstreamOutcomeUnknown(
                    "Idempotency-Key %r: its first request was interrupted (the gateway stopped while submitting "
                    "it); the task may have been created upstream, so this key is not submitted again" % key)
            if claim.failure is not None:
                self.replays += 1
                raise UpstreamOutcomeUnknown(
                    "Idempotency-Key %r: its first request reached the upstream but no answer came back; the task "
                    "may have been created upstream, so this key is not submitted again" % key)
            if self.clock() > deadline:  # cannot be: an unfulfilled claim expires by then
                raise ApiError(409, "Idempotency-Key %r: its first request is still being submitted" % key,
                               param="Idempotency-Key", code="idempotency_key_in_use")
            await asyncio.sleep(0.05)  # another process is submitting it: its answer comes soon
        try:
            task = await submit(request)
        except UpstreamOutcomeUnknown:
            await self._bind(scope, key, None, UpstreamOutcomeUnknown.code)  # never a second job for this key
            raise
        except NotRecorded as e:  # the task exists: the key is its, once the store is back
            await self._bind(scope, key, e.uuid, None)
            raise
        except BaseException:
            await self.store.release(scope, key)  # nothing was created: the key may be used again
            raise
        await self.store.fulfil(scope, key, task.uuid, self.ttl, self.clock())
        return task

    def _interrupted(self, claim: Claim) -> bool:
        """A claim with neither task nor outcome whose attempt cannot still be running: left by a
        process of another start when this one is the store's only user, or older than any submit."""
        return (self.sole and claim.boot != self.boot) or self.clock() - claim.claimed_at > self.claim_ttl

    async def _bind(self, scope: str, key: str, uuid: str | None, failure: str | None) -> None:
        try:
            await self.store.fulfil(scope, key, uuid, self.ttl, self.clock(), failure)
        except StoreUnavailable as e:  # kept by the store and retried; the claim holds the key meanwhile
            log.warning("Idempotency-Key of %s: its outcome could not be committed yet: %s", scope, e)

    def remember(self, scope: str, request: GenerationRequest, outcome: Task | UpstreamOutcomeUnknown) -> None:
        """What a submit without a key came to, for an SDK's retry of the same request."""
        self._recent.put((scope, request), outcome)

    def retried(self, scope: str, request: GenerationRequest) -> Task | None:
        """The task this caller made for the same request within the retry window, if any;
        raises the first attempt's UpstreamOutcomeUnknown again if that is how it ended."""
        outcome = self._recent.get((scope, request))
        if outcome is None:
            return None
        self.replays += 1
        if isinstance(outcome, UpstreamOutcomeUnknown):
            raise UpstreamOutcomeUnknown(str(outcome))
        return outcome

    @staticmethod
    def _check(key: str, stored: str, given: str) -> None:
        if stored != given:
            raise invalid("Idempotency-Key %r was already used for a different request" % key,
                          param="Idempotency-Key", code="idempotency_key_reused")
