"""What each caller may do and has done: admission of submits (rate window, daily images),
refunds, waiters per caller, task ownership, and the usage record. The store is the truth;
what is kept here is a bounded cache in front of it (owners) or per-process state (waiters)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from zimage_tornado.cache import ResultCache
from zimage_tornado.domain import GenerationRequest, Task
from zimage_tornado.metrics import Metrics
from zimage_tornado.store import EXPIRED, Admission, NotRecorded, Store, StoreUnavailable, TaskRecord, recorded_time
from zimage_tornado.tenants import ANONYMOUS, Caller
from zimage_tornado.webhooks import Subscription, expired_notice, final_notice

log = logging.getLogger("zimage_tornado.accounts")


class Refused(Exception):
    """A submit refused by the caller's limits before anything reached the upstream."""

    def __init__(self, admission: Admission, kind: str = "requests") -> None:
        super().__init__(admission.reason)
        self.admission = admission
        self.kind = kind  # "requests" (submits) or "reads" (task reads and picture downloads)


class TooManyCallerWaiters(Exception):
    """This caller already has its plan's max_waiters clients waiting."""


class Accounts:
    def __init__(self, store: Store, metrics: Metrics, *, clock: Callable[[], float], record_prompts: bool,
                 owners_cached: int, visibility: str, keys_configured: Callable[[], bool]) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.record_prompts = record_prompts
        self.owners: ResultCache[str, str] = ResultCache(owners_cached, float("inf"))
        self._keys_configured = keys_configured  # keys may be added or removed while running
        self.owner_only = visibility == "owner"
        self.waiting: Counter[str] = Counter()  # by caller scope; an entry lives while it is non-zero
        self.on_notice: Callable[[], None] = lambda: None  # a webhook message may be waiting (the deliverer)

    # -- submits ------------------------------------------------------------------------------

    async def admit(self, caller: Caller, images: int) -> Admission:
        """Counts one submit of `images` against the caller's plan, committed before it returns
        (so a store that cannot write stops the submit here: StoreUnavailable). Raises Refused
        (the refusal counted) when over the limits."""
        admission = await self.store.admit(caller.scope, caller.plan, images, self.clock())
        if not admission.allowed:
            await self.refused(caller, admission.reason or "refused")
            raise Refused(admission)
        return admission

    async def admit_read(self, caller: Caller, default_limit: int) -> Admission:
        """Counts one task read or picture download; raises Refused (kind "reads") over the limit."""
        try:
            admission = await self.store.admit_read(caller.scope, caller.plan.reads_limit(default_limit),
                                                    self.clock())
        except StoreUnavailable as e:  # reads cost no money: while the fleet's store is away, they go on
            log.warning("reads of %s are not counted: %s", caller.name, e)
            return Admission(True)
        if not admission.allowed:
            await self.refused(caller, "read_limit_exceeded")
            raise Refused(admission, kind="reads")
        return admission

    async def refused(self, caller: Caller, reason: str) -> None:
        self.metrics.observe_refusal(caller.name, reason)
        await self.store.count_refusal(caller.name, reason, self.clock())

    async def refund(self, caller: Caller, admission: Admission, images: int) -> None:
        """The upstream certainly refused the job: its images are not spent."""
        await self.store.refund(caller.scope, admission.day, images if admission.images is not None else 0,
                                admission.ticket)

    async def submitted(self, caller: Caller, request: GenerationRequest, task: Task, model: str,
                        admission: Admission, end_user: str | None = None,
                        webhook: Subscription | None = None) -> None:
        """The upstream accepted `task`: its owner and usage row, committed before the answer.
        Raises NotRecorded if the store cannot commit it (it keeps the row and retries)."""
        self.owners.put(task.uuid, caller.name)
        self.metrics.observe_submit(caller.name, request.batch_size)
        keep = self.record_prompts
        try:
            await self.store.record_task(TaskRecord(
                uuid=task.uuid, key=caller.name, client=caller.client, model=model, width=request.width,
                height=request.height, batch_size=request.batch_size, steps=request.steps,
                prompt=request.prompt if keep else None, negative_prompt=request.negative_prompt if keep else None,
                submitted_at=recorded_time(self.clock()), end_user=end_user,
                webhook_url=webhook.url if webhook else None,
                webhook_events=list(webhook.events) if webhook else None), admission.ticket)
        except StoreUnavailable as e:
            log.error("task %s of %s: its record could not be committed yet (%s); retrying", task.uuid,
                      caller.name, e)
            raise NotRecorded(task.uuid, e) from e

    async def finished(self, task: Task, links: tuple[str, ...] | None = None) -> None:
        """The engine saw a task's final state (once per task while it is cached); its webhook
        message, if it has a webhook, goes in the same store write (with `links`, the gateway's
        own links to its pictures)."""
        now = self.clock()
        await self.store.finish_task(task.uuid, task.status, now, len(task.image_urls), task.error,
                                     list(task.image_urls), final_notice(task, now, links))
        self.on_notice()

    async def expired(self, uuid: str) -> None:
        """The gateway stopped following a task before it ended (follow_budget)."""
        now, reason = self.clock(), "not finished within follow_budget"
        await self.store.finish_task(uuid, EXPIRED, now, 0, reason, [], expired_notice(uuid, now, reason))
        self.on_notice()

    # -- reading tasks ------------------------------------------------------------------------

    async def may_read(self, caller: Caller, uuid: str) -> bool:
        """With keys and task_visibility=owner, a task is its submitter's (and admins'); anyone
        else is told it does not exist."""
        if not (self.owner_only and self._keys_configured()) or caller.admin:
            return True
        owner = self.owners.get(uuid)
        if owner is None:
            owner = await self.store.owner(uuid)
            if owner is not None:
                self.owners.put(uuid, owner)
        return owner is not None and owner == caller.name and owner != ANONYMOUS

    # -- waiting ------------------------------------------------------------------------------

    def enter_wait(self, caller: Caller) -> None:
        limit = caller.plan.max_waiters
        if limit and self.waiting[caller.scope] >= limit:
            raise TooManyCallerWaiters()
        self.waiting[caller.scope] += 1

    def leave_wait(self, caller: Caller) -> None:
        self.waiting[caller.scope] -= 1
        if self.waiting[caller.scope] <= 0:
            del self.waiting[caller.scope]
