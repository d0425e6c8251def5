"""The shared store: Redis, through redis-py's asyncio client, for a fleet of instances (worker
processes or machines) that must behave like one gateway.

Every key starts with `zimage:`. What lives here and how:
- admission: one Lua script per submit (the scope's rate window as a sorted set of the last
  minute's requests, the day's images as a counter), checked and counted atomically;
- Idempotency-Keys: `SET NX PX` claims, fulfilled with the task uuid (Lua, compare and set);
- tasks: one JSON value per task (its usage row, which names its owner) with a TTL of
  `record_ttl`, the recent ones in sorted sets, and per-day hashes of counts per key, so that
  /admin/usage and `zimage-tornado usage --redis-url` answer for the whole fleet;
- polling (RedisCoordination): an instance reads a task's status upstream only while it holds
  the task's lease (`SET NX PX`, one interval, renewed by its holder after each read and never
  by another), publishes each state on the task's channel and keeps the latest; instances with
  waiters on the task follow the channel, and take the lease over when its holder stops renewing.

Every call has a timeout (`redis_timeout`): a hung Redis cannot hang a request. Failures become
StoreUnavailable; redis-py reconnects by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid as uuidlib
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from zimage_tornado.domain import Task
from zimage_tornado.store import (DAY, NOT_SENT_DISABLED, PENDING, SUBMITTED, Admission, Claim, Notice, Store,
                                  StoreUnavailable, TaskQuery, TaskRecord, UsageRow, WebhookMessage, day_start, decide,
                                  utc_day)
from zimage_tornado.tenants import Plan
from zimage_tornado.watcher import Coordination

log = logging.getLogger("zimage_tornado.store")
T = TypeVar("T")

PREFIX = "zimage:"
RECENT_KEPT = 10_000  # tasks listed by /admin/tasks, overall and per key
OUTBOX_SECONDS = 0.05
RETRY_SECONDS = 1.0  # a failed pipeline of kept writes is sent again after this
MAX_QUEUED = 100_000  # writes waiting for the next pipeline: past this Redis is not keeping up
MAX_DAYS = 366  # a usage query's longest range

ADMIT = """
local now, rpm, ipd, images = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local count, oldest, used = 0, false, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
  count = redis.call('ZCARD', KEYS[1])
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then oldest = first[2] end
end
if ipd > 0 then used = tonumber(redis.call('GET', KEYS[2]) or '0') end
if not (rpm > 0 and count >= rpm) and not (ipd > 0 and used + images > ipd) then
  if rpm > 0 then
    redis.call('ZADD', KEYS[1], now, ARGV[5])
    redis.call('PEXPIRE', KEYS[1], 61000)
  end
  if ipd > 0 then
    redis.call('INCRBY', KEYS[2], images)
    redis.call('EXPIRE', KEYS[2], 172800)
  end
end
return {count, oldest, used}
"""
FULFIL = """
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local claim = cjson.decode(value)
if ARGV[1] ~= '' then claim.u = ARGV[1] end
if ARGV[3] ~= '' then claim.f = ARGV[3] end
redis.call('SET', KEYS[1], cjson.encode(claim), 'PX', ARGV[2])
return 1
"""
RELEASE = """
local value = redis.call('GET', KEYS[1])
if value then
  local claim = cjson.decode(value)
  if claim.u == cjson.null and (claim.f == nil or claim.f == cjson.null) then redis.call('DEL', KEYS[1]) end
end
return 0
"""
# A webhook message joins the outbox: stored, due (by next attempt), pending (by age), listed.
ADD_WEBHOOK = """
local function add_webhook(prefix, message, ttl, kept)
  if not redis.call('SET', prefix .. 'wh:' .. message.id, cjson.encode(message), 'EX', ttl, 'NX') then return end
  redis.call('ZADD', prefix .. 'wh:due', message.next_at, message.id)
  redis.call('ZADD', prefix .. 'wh:pending', message.created_at, message.id)
  for _, name in ipairs({prefix .. 'wh:recent', prefix .. 'wh:recent:' .. message.key}) do
    redis.call('ZADD', name, message.created_at, message.id)
    redis.call('ZREMRANGEBYRANK', name, 0, -kept - 1)
  end
end
"""
FINISH = ADD_WEBHOOK + """
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local task = cjson.decode(value)
if task.finished_at ~= cjson.null and task.status ~= 'expired' then return 0 end
task.status, task.finished_at, task.image_count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
task.error = cjson.decode(ARGV[4])
task.image_urls = cjson.decode(ARGV[5])
redis.call('SET', KEYS[1], cjson.encode(task), 'KEEPTTL')
if ARGV[1] == 'failed' then redis.call('HINCRBY', ARGV[6] .. task.day, task.key .. '\\tfailed', 1) end
-- the task's end and its message in one step: the outbox is transactional
if ARGV[7] ~= '' and type(task.webhook_url) == 'string' and type(task.webhook_events) == 'table' then
  for _, wanted in ipairs(task.webhook_events) do
    if wanted == ARGV[8] then
      add_webhook(ARGV[12], {id = ARGV[7], key = task.key, task = task.uuid, type = ARGV[8], url = task.webhook_url,
                             body = ARGV[9], created_at = tonumber(ARGV[10]), status = 'pending', attempts = 0,
                             next_at = tonumber(ARGV[10])}, tonumber(ARGV[11]), tonumber(ARGV[13]))
    end
  end
end
return 1
"""
NEW_WEBHOOK = ADD_WEBHOOK + """
add_webhook(ARGV[1], cjson.decode(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"""
CLAIM_WEBHOOKS = """
-- Due messages, each leased to the caller by moving its due time past the lease.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local found = {}
for _, id in ipairs(ids) do
  local value = redis.call('GET', ARGV[4] .. id)
  if not value then
    redis.call('ZREM', KEYS[1], id)
  else
    local message = cjson.decode(value)
    if redis.call('HEXISTS', KEYS[2], message.key .. '\\t' .. message.url) == 1 then
      -- its URL answered 410 to an earlier message: settled, never sent
      message.status, message.next_at, message.last_error = 'disabled', cjson.null, ARGV[5]
      redis.call('SET', ARGV[4] .. id, cjson.encode(message), 'KEEPTTL')
      redis.call('ZREM', KEYS[1], id)
      redis.call('ZREM', KEYS[3], id)
    else
      redis.call('ZADD', KEYS[1], ARGV[3], id)
      found[#found + 1] = value
    end
  end
end
return found
"""
WEBHOOK_ATTEMPTED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
else
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
end
return 1
"""
RETRY_WEBHOOK = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
local message = cjson.decode(value)
message.status, message.next_at = 'pending', tonumber(ARGV[1])
value = cjson.encode(message)
redis.call('SET', KEYS[1], value, 'KEEPTTL')
redis.call('ZADD', KEYS[2], ARGV[1], message.id)
redis.call('ZADD', KEYS[3], message.created_at, message.id)
redis.call('HDEL', KEYS[4], message.key .. '\\t' .. message.url)
return value
"""
RECORD = """
-- Sent again after a timeout, it may find its first run done: count a task once.
if not redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then return 0 end
for i = 2, 3 do
  redis.call('ZADD', KEYS[i], ARGV[4], ARGV[3])
  redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -tonumber(ARGV[7]) - 1)
end
redis.call('HINCRBY', KEYS[4], ARGV[5] .. '\ttasks', 1)
redis.call('HINCRBY', KEYS[4], ARGV[5] .. '\timages', tonumber(ARGV[6]))
redis.call('EXPIRE', KEYS[4], ARGV[2])
return 1
"""
PACE = """
-- The fleet's bucket of upstream status reads (GCRA): ARGV now, seconds a read, burst window, hold.
local now, step, hold, only_free = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local wait = 0
if hold > 0 then
  tat = math.max(tat, now + hold + 1 - step)
else
  tat = math.max(tat, now)
  wait = math.max(0, tat - (1 - step) - now)
  if only_free and wait > 0 then return '-1' end
  tat = tat + step
end
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return tostring(wait)
"""
LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


async def bounded(call: Awaitable[T], timeout: float) -> T:
    """One Redis call within redis_timeout; any failure is StoreUnavailable."""
    try:
        async with asyncio.timeout(timeout):  # no task of its own, unlike wait_for
            return await call
    except (RedisError, OSError, asyncio.TimeoutError) as e:
        raise StoreUnavailable("Redis is unavailable (%s)" % type(e).__name__) from e


def connect(url: str, timeout: float, connections: int) -> aioredis.Redis:
    """A client whose pool holds at most `connections`: a burst of calls waits (up to `timeout`)
    for a free one instead of failing, and a fleet's connection count stays known for sizing."""
    # health_check_interval: a connection idle for a while is checked before use, not found dead mid-request
    # No socket_timeout: every call runs within asyncio.timeout(redis_timeout) already, and
    # redis-py's own per-read timer would cost a second one per command.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=connections, timeout=timeout, socket_connect_timeout=timeout,
        health_check_interval=30, decode_responses=True)
    return aioredis.Redis(connection_pool=pool)


class RedisStore(Store):
    name = "redis"

    def __init__(self, url: str, *, timeout: float, record_ttl: float, connections: int = 32) -> None:
        self.url = url
        self.timeout = timeout
        self.record_ttl = record_ttl
        self.redis = connect(url, timeout, connections)
        self._admit = self.redis.register_script(ADMIT)
        self._fulfil = self.redis.register_script(FULFIL)
        self._release = self.redis.register_script(RELEASE)
        self._finish = self.redis.register_script(FINISH)
        self._record = self.redis.register_script(RECORD)
        self._new_webhook = self.redis.register_script(NEW_WEBHOOK)
        self._claim_webhooks = self.redis.register_script(CLAIM_WEBHOOKS)
        self._webhook_attempted = self.redis.register_script(WEBHOOK_ATTEMPTED)
        self._retry_webhook = self.redis.register_script(RETRY_WEBHOOK)
        self._outbox: list[Callable[[Any], Awaitable[Any]]] = []  # writes nobody waits for, sent as one pipeline
        self._sending: asyncio.Task[None] | None = None

    def open(self) -> None:
        """redis-py connects on first use (and again after a failure)."""

    async def ready(self) -> None:
        await self._do(self.redis.ping())
        for warning in await self.durability_warnings():
            log.warning("store: %s", warning)

    async def durability_warnings(self) -> list[str]:
        """What in Redis's own settings can lose quota use, ownership or Idempotency-Keys: no
        persistence (a restart forgets them) or an eviction policy (memory pressure drops them)."""
        try:
            config: dict[str, str] = {}
            for name in ("appendonly", "save", "maxmemory-policy"):
                answer: dict[Any, Any] = await self._do(self.redis.config_get(name))
                config.update({str(k): str(v) for k, v in answer.items()})
        except (StoreUnavailable, RedisError) as e:
            log.info("store: cannot read Redis's persistence settings (%s); make sure it keeps its data", e)
            return []
        warnings = []
        if config.get("appendonly", "no") != "yes":
            if not config.get("save"):
                warnings.append("Redis keeps nothing on disk (appendonly no, save \"\"): a restart of Redis "
                                "forgets quota use, task ownership and Idempotency-Keys; set appendonly yes")
            else:
                warnings.append("Redis persists by snapshots only (appendonly no, save %r): a crash loses the "
                                "quota use, ownership and Idempotency-Keys written since the last snapshot; set "
                                "appendonly yes" % config["save"])
        policy = config.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            warnings.append("Redis maxmemory-policy is %s: under memory pressure it evicts quota counters, "
                            "ownership and Idempotency-Keys; set maxmemory-policy noeviction" % policy)
        return warnings

    async def close(self) -> None:
        if self._sending is not None:
            await asyncio.gather(self._sending, return_exceptions=True)
        if self._outbox:
            await self._send()
        await self.redis.aclose()

    async def healthy(self) -> str | None:
        try:
            await self._do(self.redis.ping())
        except StoreUnavailable as e:
            return str(e)
        return None

    async def _do(self, call: Awaitable[T]) -> T:
        return await bounded(call, self.timeout)

    def _later(self, write: Callable[[Any], Awaitable[Any]]) -> None:
        """A write nobody waits for: queued, and sent with the others of the next OUTBOX_SECONDS
        as one pipeline (one round trip, and far less client work than one call each); kept and
        sent again while Redis fails."""
        if len(self._outbox) >= MAX_QUEUED:
            self.dropped += 1
            log.error("store: Redis is not keeping up; a usage write was dropped")
            return
        self._outbox.append(write)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.ensure_future(self._send_soon())

    async def _send_soon(self) -> None:
        await asyncio.sleep(OUTBOX_SECONDS)
        while self._outbox and not await self._send():
            await asyncio.sleep(RETRY_SECONDS)

    async def _send(self) -> bool:
        writes, self._outbox = self._outbox, []
        pipe = self.redis.pipeline(transaction=False)
        for write in writes:
            await write(pipe)  # queues it in the pipeline (a script's call is a coroutine even there)
        try:
            await self._do(pipe.execute())
        except StoreUnavailable as e:  # the submits they record went through: keep them for the next try
            log.error("store: %d writes failed (%s); retrying", len(writes), e)
            room = MAX_QUEUED - len(self._outbox)
            self.dropped += max(0, len(writes) - room)
            self._outbox[:0] = writes[:room]
            return False
        return True

    # -- admission ------------------------------------------------------------------------------

    async def admit(self, scope: str, plan: Plan, images: int, now: float) -> Admission:
        day = utc_day(now)
        count, oldest, used = await self._do(self._admit(
            keys=[PREFIX + "hits:" + scope, PREFIX + "quota:%s:%s" % (scope, day)],
            args=[repr(now), plan.requests_per_minute, plan.images_per_day, images,
                  "%r:%s" % (now, uuidlib.uuid4().hex[:8])]))
        return decide(plan, images, now, day, int(count), float(oldest) if oldest else None, int(used))

    async def admit_read(self, scope: str, per_minute: int, now: float) -> Admission:
        """The fleet's count: the same rate window script as submits, on a scope of its own."""
        if not per_minute:
            return Admission(True)
        return await self.admit("reads:" + scope, Plan(requests_per_minute=per_minute), 0, now)

    async def refund(self, scope: str, day: str, images: int, ticket: int | None = None) -> None:
        async def write(pipe: Any) -> Any:
            return pipe.decrby(PREFIX + "quota:%s:%s" % (scope, day), images)
        self._later(write)

    # -- idempotency ----------------------------------------------------------------------------

    async def claim(self, scope: str, key: str, digest: str, ttl: float, now: float, boot: str) -> Claim:
        name = PREFIX + "idem:%s\0%s" % (scope, key)
        for _ in range(3):  # a claim may expire between SET and GET: claim again
            # the time as a string: cjson (the fulfil script) would round a number to 14 digits
            if await self._do(self.redis.set(name, json.dumps({"d": digest, "u": None, "t": repr(now), "b": boot}),
                                             nx=True, px=int(ttl * 1000))):
                return Claim(True, digest, claimed_at=now, boot=boot)
            value = await self._do(self.redis.get(name))
            if value is not None:
                held = json.loads(value)
                return Claim(False, held["d"], held["u"], held.get("f"), float(held.get("t") or 0), held.get("b", ""))
        raise StoreUnavailable("Redis: the Idempotency-Key claim kept changing")

    async def fulfil(self, scope: str, key: str, uuid: str | None, ttl: float, now: float,
                     failure: str | None = None) -> None:
        keys = [PREFIX + "idem:%s\0%s" % (scope, key)]
        args: list[str | int] = [uuid or "", int(ttl * 1000), failure or ""]
        await self._kept(lambda client: self._fulfil(keys=keys, args=args, client=client))

    async def _kept(self, write: Callable[[Any], Awaitable[Any]]) -> None:
        """A write an answer depends on: awaited; if Redis fails, StoreUnavailable, and the write
        is kept and sent again until it lands."""
        try:
            await self._do(write(self.redis))
        except StoreUnavailable:
            self._later(write)
            raise

    async def release(self, scope: str, key: str) -> None:
        self._later(lambda pipe: self._release(keys=[PREFIX + "idem:%s\0%s" % (scope, key)], client=pipe))

    # -- tasks and usage --------------------------------------------------------------------------

    async def record_task(self, record: TaskRecord, ticket: int | None = None) -> None:
        """Awaited, unlike the other usage writes: the row names the task's owner, which any
        instance may be asked about the moment the submit is answered."""
        day = utc_day(record.submitted_at)
        keys = [PREFIX + "task:" + record.uuid, PREFIX + "recent", PREFIX + "recent:" + record.key,
                PREFIX + "usage:" + day]
        args: list[str | int] = [json.dumps({**record.as_dict(), "day": day}), int(self.record_ttl), record.uuid,
                repr(record.submitted_at), record.key, record.batch_size, RECENT_KEPT]
        await self._kept(lambda client: self._record(keys=keys, args=args, client=client))

    async def finish_task(self, uuid: str, status: str, finished_at: float, image_count: int,
                          error: str | None, image_urls: list[str], notice: Notice | None = None) -> None:
        args: list[str | int] = [status, repr(finished_at), image_count, json.dumps(error), json.dumps(image_urls),
                                 PREFIX + "usage:"]
        args += ([notice.id, notice.type, notice.body, repr(notice.created_at)] if notice else ["", "", "", "0"])
        args += [int(self.record_ttl), PREFIX, RECENT_KEPT]
        self._later(lambda pipe: self._finish(keys=[PREFIX + "task:" + uuid], args=args, client=pipe))

    # -- webhook messages -----------------------------------------------------------------------

    async def add_webhook(self, message: WebhookMessage) -> None:
        args: list[str | int] = [PREFIX, json.dumps(message.as_dict()), int(self.record_ttl), RECENT_KEPT]
        self._later(lambda pipe: self._new_webhook(args=args, client=pipe))

    async def claim_webhooks(self, now: float, limit: int, lease: float) -> list[WebhookMessage]:
        values = await self._do(self._claim_webhooks(keys=[PREFIX + "wh:due", PREFIX + "wh:off", PREFIX + "wh:pending"],
                                                     args=[repr(now), limit, repr(now + lease), PREFIX + "wh:",
                                                           NOT_SENT_DISABLED]))
        return [webhook_message(value) for value in values]

    async def webhook_attempted(self, message: WebhookMessage) -> None:
        keys = [PREFIX + "wh:" + message.id, PREFIX + "wh:due", PREFIX + "wh:pending"]
        due = repr(message.next_at) if message.status == PENDING and message.next_at is not None else ""
        args = [json.dumps(message.as_dict()), due, message.id]
        await self._kept(lambda client: self._webhook_attempted(keys=keys, args=args, client=client))

    async def find_webhooks(self, key: str | None, status: str | None, limit: int) -> list[WebhookMessage]:
        name = PREFIX + "wh:recent" + (":" + key if key else "")
        found: list[WebhookMessage] = []
        offset, chunk = 0, max(limit, 100)
        while len(found) < limit and offset < RECENT_KEPT:
            ids: list[str] = await self._do(self.redis.zrevrange(name, offset, offset + chunk - 1))  # type: ignore[arg-type]
            if not ids:
                break
            offset += len(ids)
            for value in await self._do(self.redis.mget([PREFIX + "wh:" + i for i in ids])):
                if value is not None:
                    message = webhook_message(value)
                    if status is None or message.status == status:
                        found.append(message)
        return found[:limit]

    async def get_webhook(self, message_id: str) -> WebhookMessage | None:
        value = await self._do(self.redis.get(PREFIX + "wh:" + message_id))
        return None if value is None else webhook_message(value)

    async def retry_webhook(self, message_id: str, now: float) -> WebhookMessage | None:
        value = await self._do(self._retry_webhook(keys=[
            PREFIX + "wh:" + message_id, PREFIX + "wh:due", PREFIX + "wh:pending", PREFIX + "wh:off"],
            args=[repr(now)]))
        return None if value is None else webhook_message(value)

    async def disable_url(self, key: str, url: str, now: float) -> None:
        await self._kept(lambda client: client.hset(PREFIX + "wh:off", "%s\t%s" % (key, url), repr(now)))

    async def url_disabled(self, key: str, url: str) -> bool:
        return bool(await self._do(self.redis.hexists(PREFIX + "wh:off", "%s\t%s" % (key, url))))

    async def webhook_backlog(self) -> tuple[int, float | None]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(PREFIX + "wh:pending")
        pipe.zrange(PREFIX + "wh:pending", 0, 0, withscores=True)
        count, oldest = await self._do(pipe.execute())
        return int(count), float(oldest[0][1]) if oldest else None

    async def unfinished(self, limit: int) -> list[tuple[str, float]]:
        records = await self.find_tasks(TaskQuery(status=SUBMITTED, limit=RECENT_KEPT))
        waiting = sorted((r.submitted_at, r.uuid) for r in records if r.status == SUBMITTED)
        return [(uuid, at) for at, uuid in waiting[:limit]]

    async def owner(self, uuid: str) -> str | None:
        value = await self._do(self.redis.get(PREFIX + "task:" + uuid))
        return None if value is None else str(json.loads(value)["key"])

    async def count_refusal(self, key: str, reason: str, now: float) -> None:
        usage = PREFIX + "usage:" + utc_day(now)

        async def write(pipe: Any) -> Any:
            return pipe.hincrby(usage, "%s\trefused\t%s" % (key, reason), 1).expire(usage, int(self.record_ttl))
        self._later(write)

    async def usage(self, since: str, until: str, key: str | None = None) -> list[UsageRow]:
        days = day_list(since, until)
        pipe = self.redis.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(PREFIX + "usage:" + day)
        return usage_rows(days, await self._do(pipe.execute()), key)

    async def find_tasks(self, query: TaskQuery) -> list[TaskRecord]:
        """From the recent sorted sets (the last RECENT_KEPT tasks, overall and per key), a page of
        candidates at a time, filtered here."""
        name = PREFIX + "recent" + (":" + query.key if query.key else "")
        # with a uuid to break ties, the cursor's own moment is included and its earlier uuids kept
        # (a sorted set orders equal scores by member: newest first is uuid descending, as in SQLite)
        tied = query.before_uuid if query.before is not None else None
        high = "+inf" if query.before is None else "%r" % query.before if tied else "(%r" % query.before
        low = repr(day_start(query.since)) if query.since else "-inf"
        until = day_start(query.until) + DAY if query.until else None
        found: list[TaskRecord] = []
        offset, chunk = 0, max(query.limit, 100)
        while len(found) < query.limit and offset < RECENT_KEPT:
            uuids: list[str] = await self._do(self.redis.zrevrangebyscore(  # type: ignore[arg-type]
                name, high, low, start=offset, num=chunk))
            if not uuids:
                break
            offset += len(uuids)
            for value in await self._do(self.redis.mget([PREFIX + "task:" + u for u in uuids])):
                if value is None:
                    continue
                task = task_record(value)
                if tied is not None and task.submitted_at == query.before and task.uuid >= tied:
                    continue
                if (query.status is None or task.status == query.status) and (
                        until is None or task.submitted_at < until) and (
                        query.end_user is None or task.end_user == query.end_user):
                    found.append(task)
        return found[:query.limit]

    async def get_task(self, uuid: str) -> TaskRecord | None:
        value = await self._do(self.redis.get(PREFIX + "task:" + uuid))
        return None if value is None else task_record(value)

    async def last_seen(self, keys: list[str]) -> dict[str, float]:
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.zrevrange(PREFIX + "recent:" + key, 0, 0, withscores=True)
        answers = await self._do(pipe.execute())
        return {key: float(answer[0][1]) for key, answer in zip(keys, answers) if answer}

    async def secret(self, name: str, candidate: str) -> str:
        key = PREFIX + "secret:" + name
        await self._do(self.redis.set(key, candidate, nx=True))
        value = await self._do(self.redis.get(key))
        return value.decode() if isinstance(value, bytes) else str(value)


def task_record(value: str | bytes) -> TaskRecord:
    """A task's stored JSON (its usage row, with the day it counts on) as a TaskRecord."""
    row = json.loads(value)
    row.pop("day", None)
    return TaskRecord(**row)


def webhook_message(value: str | bytes) -> WebhookMessage:
    return WebhookMessage(**json.loads(value))


def day_list(since: str, until: str) -> list[str]:
    start, end = day_start(since), day_start(until)
    count = min(MAX_DAYS, int((end - start) // DAY) + 1)
    return [utc_day(start + i * DAY) for i in range(count)]


def usage_rows(days: list[str], hashes: list[dict[str, str]], key: str | None) -> list[UsageRow]:
    rows: list[UsageRow] = []
    for day, fields in zip(days, hashes):
        per_key: dict[str, dict[str, Any]] = {}
        for field, value in fields.items():
            name, kind, *reason = field.split("\t")
            if key is not None and name != key:
                continue
            row = per_key.setdefault(name, {"tasks": 0, "images": 0, "failed": 0, "refused": 0,
                                            "refused_by_reason": {}})
            if kind == "refused":
                row["refused"] += int(value)
                row["refused_by_reason"][reason[0] if reason else "refused"] = int(value)
            elif kind in ("tasks", "images", "failed"):
                row[kind] += int(value)
        rows += [UsageRow(name, day, **fields) for name, fields in sorted(per_key.items())]
    return sorted(rows, key=lambda row: (row.key, row.day))


# -- the fleet's polling ---------------------------------------------------------------------------

def task_json(task: Task) -> str:
    return json.dumps({"uuid": task.uuid, "status": task.status, "progress": task.progress, "at": time.time(),
                       "image_urls": list(task.image_urls), "error": task.error,
                       "queue_position": task.queue_position, "raw": task.raw, "document": task.document})


def task_from_json(value: str) -> Task:
    data = json.loads(value)
    return Task(data["uuid"], data["status"], data["progress"], tuple(data["image_urls"]), data["error"],
                data["queue_position"], data["raw"], data["document"])


class RedisCoordination(Coordination):
    """See the module's docstring. One pub/sub connection per instance; a task's channel is
    followed only while this instance has waiters on it."""

    def __init__(self, url: str, *, timeout: float, interval: float, cache_ttl: float, connections: int = 32) -> None:
        self.redis = connect(url, timeout, connections)
        # Pub/sub holds a connection of its own for good: from a client of its own, so that it can
        # never take the pool's; subscriptions one at a time (concurrent ones would each take one).
        self._subscriber = connect(url, timeout, 1)
        self._subscribing = asyncio.Lock()
        self.timeout = timeout
        self.lease_ms = max(1, int(interval * 1000))  # renewed after each read: reads are an interval apart
        self.state_ms = max(1, int(3 * interval * 1000))
        self.cache_ttl = int(cache_ttl)
        self.instance = "%s:%d:%s" % (os.uname().nodename, os.getpid(), uuidlib.uuid4().hex[:8])
        self._lease = self.redis.register_script(LEASE)
        self._pace = self.redis.register_script(PACE)
        self._followers: dict[str, Callable[[Task], None]] = {}
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None

    async def _do(self, call: Awaitable[T]) -> T:
        return await bounded(call, self.timeout)

    async def lease(self, uuid: str) -> bool:
        return bool(await self._do(self._lease(keys=[PREFIX + "lease:" + uuid],
                                               args=[self.instance, self.lease_ms])))

    async def pace(self, rate: float, hold: float = 0.0, only_free: bool = False) -> float | None:
        wait = float(await self._do(self._pace(keys=[PREFIX + "pace"], args=[
            repr(time.time()), repr(1.0 / rate), repr(hold), int(only_free)])))
        return None if wait < 0 else wait

    async def publish(self, task: Task) -> None:
        value = task_json(task)
        pipe = self.redis.pipeline(transaction=False)
        if task.is_final:
            pipe.set(PREFIX + "final:" + task.uuid, value, ex=self.cache_ttl)
        else:
            pipe.set(PREFIX + "state:" + task.uuid, value, px=self.state_ms)
        pipe.publish(PREFIX + "task:" + task.uuid, value)
        await self._do(pipe.execute())

    async def shared(self, uuid: str) -> Task | None:
        value = await self._do(self.redis.get(PREFIX + "final:" + uuid))
        return None if value is None else task_from_json(str(value))

    async def recent(self, uuid: str, max_age: float) -> Task | None:
        value = await self._do(self.redis.get(PREFIX + "state:" + uuid))
        if value is None or json.loads(value).get("at", 0) < time.time() - max_age:
            return None
        return task_from_json(str(value))

    async def follow(self, uuid: str, heard: Callable[[Task], None]) -> None:
        self._followers[uuid] = heard
        if self._pubsub is None:
            self._pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
        async with self._subscribing:
            await self._do(self._pubsub.subscribe(PREFIX + "task:" + uuid))
        if self._listener is None or self._listener.done():
            self._listener = asyncio.ensure_future(self._listen())
        # A state published before we subscribed would be missed: take the latest kept one.
        value = await self._do(self.redis.get(PREFIX + "final:" + uuid)) or \
            await self._do(self.redis.get(PREFIX + "state:" + uuid))
        if value is not None and uuid in self._followers:
            self._followers[uuid](task_from_json(str(value)))

    async def unfollow(self, uuid: str) -> None:
        self._followers.pop(uuid, None)
        if self._pubsub is not None:
            async with self._subscribing:
                await self._do(self._pubsub.unsubscribe(PREFIX + "task:" + uuid))

    async def _listen(self) -> None:
        """Delivers published states to the tasks followed here; rides out Redis restarts
        (redis-py reconnects and subscribes again)."""
        while self._followers or self._pubsub.subscribed:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (RedisError, OSError) as e:
                log.warning("store: the Redis subscription failed (%s); retrying", type(e).__name__)
                await asyncio.sleep(0.5)
                continue
            if message is None or message.get("type") != "message":
                continue
            uuid = str(message["channel"])[len(PREFIX + "task:"):]
            heard = self._followers.get(uuid)
            if heard is not None:
                try:
                    heard(task_from_json(str(message["data"])))
                except Exception:  # noqa: BLE001 - one bad message must not stop the listener
                    log.exception("store: a published state could not be used")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self._subscriber.aclose()
        await self.redis.aclose()
