"""Gateway: the objects every request shares, built once from the settings, and the one path
of a submit (limits, idempotency, upstream, usage record).

It sits below the HTTP layer: handlers receive it, nothing here knows about handlers."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from tornado.ioloop import IOLoop, PeriodicCallback

from zimage_tornado.accounts import Accounts
from zimage_tornado.cache import ResultCache
from zimage_tornado.config import Settings
from zimage_tornado.deadlines import BodyDeadlines
from zimage_tornado.delivery import Deliverer
from zimage_tornado.domain import COMPLETED, GenerationRequest, Task
from zimage_tornado.idempotency import IdempotencyStore
from zimage_tornado.images import SIDE_MARGIN, ImageFetcher, make_image_client
from zimage_tornado.links import Links
from zimage_tornado.metrics import Metrics
from zimage_tornado.openai_api import ModelTable
from zimage_tornado.pictures import Keeper, Shelf, Sources, given, open_backend
from zimage_tornado.store import Admission, Store, StoreUnavailable
from zimage_tornado.store.sqlite import SqliteStore
from zimage_tornado.tenants import Caller, KeyRing, LiveKeys, Plan
from zimage_tornado.upstream import (UpstreamBadResponse, UpstreamError, UpstreamOutcomeUnknown, ZImageClient,
                                     make_http_client)
from zimage_tornado.watcher import Coordination, TaskWatcher
from zimage_tornado.webhooks import WebhookRequest, Webhooks

log = logging.getLogger("zimage_tornado.gateway")


RESUMED_AT_MOST = 100_000  # unfinished tasks taken up again at start
PICTURES_GC_SECONDS = 3600.0  # kept pictures past their age are removed at least this often


@dataclass
class Submitted:
    task: Task
    admission: Admission | None = None  # the caller's limits as counted by this submit, if any


def make_store(settings: Settings, clock: Callable[[], float]) -> Store:
    if settings.redis_url:
        from zimage_tornado.store.redis import RedisStore  # redis-py is loaded only where a fleet needs it
        return RedisStore(settings.redis_url, timeout=settings.redis_timeout, record_ttl=settings.record_ttl,
                          connections=settings.redis_connections)
    # One process owns the file and may decide admissions in memory; workers sharing it may not.
    return SqliteStore(settings.database, record_ttl=settings.record_ttl, clock=clock,
                       exclusive=settings.workers == 1)


def make_coordination(settings: Settings) -> Coordination:
    """How this instance shares the polling of tasks with the rest of its fleet, if it has one."""
    if settings.redis_url:
        from zimage_tornado.store.redis import RedisCoordination
        return RedisCoordination(settings.redis_url, timeout=settings.redis_timeout,
                                 interval=settings.poll_interval, cache_ttl=settings.cache_ttl,
                                 connections=settings.redis_connections)
    return Coordination()


class Gateway:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock  # wall-clock seconds: UTC days and the usage record (tests move it)
        self.live_keys = LiveKeys(settings.api_keys, settings.api_keys_file)
        self.anonymous_plan = Plan(settings.ip_requests_per_minute, settings.ip_images_per_day,
                                   settings.ip_max_waiters, settings.ip_reads_per_minute)
        self.http = make_http_client(
            settings.upstream_client,
            max_clients=settings.upstream_max_clients,
            connect_timeout=settings.upstream_connect_timeout,
            request_timeout=settings.upstream_timeout,
            ca_certs=settings.upstream_ca_certs,
            url=settings.upstream_url,
        )
        self.store = make_store(settings, clock)
        self.store.open()
        self.metrics = Metrics()
        self.accounts = Accounts(self.store, self.metrics, clock=clock, record_prompts=settings.record_prompts,
                                 owners_cached=settings.cache_size, visibility=settings.task_visibility,
                                 keys_configured=lambda: bool(self.keys))
        # No submit runs longer than claim_ttl: a claim older than that, still unended, was interrupted.
        self.idempotency = IdempotencyStore(self.store, ttl=settings.idempotency_ttl, clock=clock,
                                            claim_ttl=settings.upstream_timeout + settings.upstream_connect_timeout,
                                            retry_window=settings.wait_budget, remembered=settings.cache_size,
                                            sole=not settings.redis_url and settings.workers == 1)
        self.image_http = make_image_client(
            upstream_url=settings.upstream_url, image_hosts=settings.image_origins, max_clients=settings.image_fetches,
            max_bytes=settings.max_image_bytes, connect_timeout=settings.upstream_connect_timeout,
            request_timeout=settings.upstream_timeout, ca_certs=settings.upstream_ca_certs or None)
        self.webhooks = Webhooks(self.store, keys=lambda: self.keys, secrets=settings.webhook_secrets,
                                 allowed_hosts=settings.webhook_allowed, clock=clock)
        self.deliverer = Deliverer(self.store, self.webhooks, clock=clock, timeout=settings.webhook_timeout,
                                   concurrency=settings.webhook_deliveries, max_attempts=settings.webhook_max_attempts,
                                   delays=settings.retry_delays)
        self.webhooks.poke = self.accounts.on_notice = self.deliverer.poke
        IOLoop.current().add_callback(self.deliverer.start)
        cookie = os.environ.get(settings.upstream_cookie_env, "") if settings.upstream_cookie_env else ""
        self.upstream = ZImageClient(settings.upstream_url, self.http, observer=self.metrics.observe_upstream,
                                     cookie=cookie, protocol=settings.upstream_protocol,
                                     image_http=self.image_http, api_key=settings.upstream_api_key)
        self.watcher = TaskWatcher(
            self.upstream,
            interval=settings.poll_interval,
            budget=settings.wait_budget,
            max_waiters=settings.max_waiters,
            cache=ResultCache(settings.cache_size, settings.cache_ttl),
            on_final=self.finished,
            coordination=make_coordination(settings),
            follow_budget=settings.follow_budget,
            follow_interval=settings.follow_interval,
            on_expired=self.accounts.expired,
            reads_per_second=settings.upstream_reads_per_second,
            on_progress=self.webhooks.progressed,
        )
        self.metrics.watch(self.watcher, self.idempotency, self.store)
        self.metrics.watch_webhooks(self.deliverer)
        max_side = math.ceil(settings.max_size * SIDE_MARGIN)
        self.images = ImageFetcher(self.upstream, max_bytes=settings.max_image_bytes,
                                   cache_bytes=settings.image_cache_bytes, at_once=settings.image_fetches,
                                   max_side=max_side)
        self.links = Links(self.store, secret=settings.link_secret, ttl=settings.link_ttl,
                           public_url=settings.public_url, clock=clock)
        self.keeper: Keeper | None = None
        if settings.pictures == "keep":
            shelf = Shelf(open_backend(settings), settings.pictures_max_bytes, settings.pictures_ttl, clock)
            self.keeper = Keeper(shelf, fetch=self.images.fetch, conversions=self.images.conversions, max_side=max_side,
                                 cache_bytes=settings.image_cache_bytes)
            self.images.kept = self.kept_picture
            self.metrics.watch_pictures(self.keeper)
            self._pictures_gc = PeriodicCallback(self.keeper.gc, PICTURES_GC_SECONDS * 1000)
            self._pictures_gc.start()
        self.models = ModelTable(settings.aliases)
        self.shutting_down = False
        self.bodies = BodyDeadlines(settings.body_timeout)
        self.active: set[Any] = set()  # handlers of requests being served, for a graceful stop
        self.live_keys.on_removed = self.revoked

    @property
    def keys(self) -> KeyRing:
        """The keys in force now (they change on SIGHUP or an edit of the keys file)."""
        return self.live_keys.ring

    async def submit(self, request: GenerationRequest, caller: Caller, model: str,
                     idempotency_key: str | None = None, retry: bool = False,
                     end_user: str | None = None, webhook: WebhookRequest | None = None) -> Submitted:
        """A new upstream task within the caller's limits, or the one the caller already made
        with `idempotency_key`, or (`retry`: an SDK's retry, without a key) for the same request
        within the last wait budget. A replay counts against no limit.

        Returns only once the task's admission, owner, usage row and key are committed; raises
        StoreUnavailable before the upstream sees anything if the store cannot write, and
        NotRecorded (naming the task) if it fails after the upstream accepted the job. A webhook
        that cannot be kept (no secret, a non-public or disabled URL) is refused first (ApiError)."""
        submitted: Submitted | None = None
        subscription = await self.webhooks.subscribe(caller, webhook)

        async def fresh(request: GenerationRequest) -> Task:
            nonlocal submitted
            admission = await self.accounts.admit(caller, request.batch_size)
            try:
                task = await self.upstream.submit(request)
            except UpstreamOutcomeUnknown:  # the job may exist: its images stay counted
                raise
            except UpstreamError:  # a definite no (refused, or never sent): the images were not spent
                await self.accounts.refund(caller, admission, request.batch_size)
                raise
            self.webhooks.remember(task.uuid, caller.name, subscription)
            try:
                await self.accounts.submitted(caller, request, task, model, admission, end_user, subscription)
            finally:
                self.watcher.follow_up(task.uuid)  # the record learns how it ends, recorded yet or not
            submitted = Submitted(task, admission)
            return task

        if idempotency_key is None:
            earlier = self.idempotency.retried(caller.scope, request) if retry else None
            if earlier is not None:
                return Submitted(earlier)
            try:
                task = await fresh(request)
            except UpstreamOutcomeUnknown as e:
                self.idempotency.remember(caller.scope, request, e)
                raise
            self.idempotency.remember(caller.scope, request, task)
        else:
            task = await self.idempotency.submit(caller.scope, idempotency_key, request, fresh)
        return submitted or Submitted(task)

    async def finished(self, task: Task) -> None:
        """The engine saw a task end: its record, then (completed) its pictures kept, in the background."""
        if self.keeper is None or task.status != COMPLETED:
            return await self.accounts.finished(task)
        if not self.settings.public_url:  # the record first: its webhook waits on nothing else
            await self.accounts.finished(task)
            return self.keeper.start(task.uuid, lambda: self.picture_sources(task))
        sources = await self.picture_sources(task)
        links = None
        try:  # a webhook receiver gets links that outlive the provider's
            await self.links.ready()
            links = self.links.pictures(self.settings.public_url, task.uuid, len(task.image_urls), len(sources.urls))
        except StoreUnavailable as e:
            log.warning("task %s: its webhook gives the provider's links (no link secret: %s)", task.uuid, e)
        await self.accounts.finished(task, links)
        self.keeper.start(task.uuid, given(sources))

    async def picture_sources(self, task: Task) -> Sources:
        """The links of a completed task's pictures that the gateway fetches: no more than it asked
        for (a hostile upstream may list hundreds), max_batch_size for a task of another record;
        and how long its key keeps pictures."""
        try:
            record = await self.store.get_task(task.uuid)
        except StoreUnavailable:
            record = None
        if record is None:
            return Sources(task.image_urls[:self.settings.max_batch_size])
        return Sources(task.image_urls[:record.batch_size], self.pictures_ttl(record.key))

    def pictures_ttl(self, key: str) -> float | None:
        """A key's own pictures_ttl from the keys file, if it has one."""
        tenant = self.keys.find(key)
        return tenant.pictures_ttl if tenant is not None else None

    async def kept_picture(self, task: Task, index: int) -> bytes:
        """A completed task's picture from the picture store (kept now if it was not yet)."""
        assert self.keeper is not None
        manifest = await self.keeper.manifest(task.uuid, lambda: self.picture_sources(task))
        if index >= len(manifest.pictures):
            raise UpstreamBadResponse("Task %s has %d pictures kept, not %d" % (task.uuid, len(manifest.pictures),
                                                                                 index + 1))
        return await self.keeper.read(manifest, index)

    def revoked(self, names: frozenset[str]) -> None:
        """Keys just removed: their event streams end now, not at follow_budget (a long-poll that
        began before keeps its answer: it ends within its own budget), and their pending webhook
        messages are given up."""
        for handler in list(self.active):
            caller = getattr(handler, "caller", None)
            if caller is not None and caller.name in names and handler.streaming:
                handler.revoked()
        IOLoop.current().add_callback(self.deliverer.give_up, names)

    async def resume(self) -> None:
        """At start: the link secret is loaded; tasks recorded as submitted and not known to have
        ended are followed again, or, past follow_budget, recorded as expired; completed tasks
        whose pictures were not kept are kept now."""
        try:
            await self.links.ready()
            if self.keeper is not None:
                await self.keeper.resume(self.store, self.clock(), self.pictures_ttl)
        except StoreUnavailable as e:
            log.warning("could not read the store to resume keeping pictures: %s", e)
        if self.settings.follow_budget <= 0:
            return
        try:
            unfinished = await self.store.unfinished(RESUMED_AT_MOST)
        except StoreUnavailable as e:
            log.warning("could not read the unfinished tasks to follow them again: %s", e)
            return
        now = self.clock()
        for uuid, submitted_at in unfinished:
            age = max(0.0, now - submitted_at)
            if age >= self.settings.follow_budget:
                await self.accounts.expired(uuid)
            else:
                self.watcher.follow_up(uuid, age)
        if unfinished:
            log.info("following %d unfinished tasks again", len(unfinished))

    async def close(self) -> None:
        await self.deliverer.close()
        await self.watcher.close()
        self.http.close()
        self.image_http.close()
        if self.keeper is not None:
            self._pictures_gc.stop()
            await self.keeper.close()
        self.images.conversions.close()
        await self.store.close()
        await self.watcher.coordination.close()
