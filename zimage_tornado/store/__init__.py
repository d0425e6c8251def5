"""The store: everything that must outlive a request or be shared between requests, behind one
interface. Handlers never know which implementation runs.

- embedded (store/sqlite.py): one SQLite file, the default; nothing to install.
- shared (store/redis.py, with `redis_url`): Redis, for several processes or machines.

The promise both keep: what a submit's answer depends on (its admission, its owner and usage
row, its Idempotency-Key) is committed before the answer is sent, and a store that cannot write
fails the submit (StoreUnavailable: 503) before anything reaches the upstream. Writes made after
an answer (a task's final state, refusal counts, refunds) are kept and retried until they land;
only an overflow of their bounded queue drops one, counted in `dropped`.

It owns admission (rate windows and daily image quotas, checked and counted in one step),
idempotency keys (claimed before a submit, so that only one caller anywhere submits), task
ownership, the usage record (one row per task, refusals per key, reason and day), and serves
the admin queries. In-memory structures elsewhere are caches in front of it, never a second truth.
"""

from __future__ import annotations

import abc
import calendar
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from zimage_tornado.tenants import Plan

DAY = 86400.0
MINUTE = 60.0
END_USER_SCAN = 100_000  # task rows read at most for a usage table by end user


def utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def day_start(day: str) -> float:
    """The first second of a UTC day given as YYYY-MM-DD."""
    return float(calendar.timegm(time.strptime(day, "%Y-%m-%d")))


def seconds_to_midnight(now: float) -> float:
    return DAY - now % DAY


@dataclass(frozen=True)
class Window:
    """One limit as the x-ratelimit-* headers tell it."""

    limit: int
    remaining: int
    reset: float  # seconds until the window has room again (requests) or resets (images)


@dataclass(frozen=True)
class Admission:
    allowed: bool
    reason: str | None = None  # "rate_limit_exceeded" or "insufficient_quota" when refused
    requests: Window | None = None
    images: Window | None = None
    retry_after: float | None = None
    day: str = ""  # the UTC day the images were counted against (for a refund)
    ticket: int | None = None  # the store's journal entry of this submit, until its task is recorded


@dataclass(frozen=True)
class Claim:
    """An Idempotency-Key claim: `mine` means this caller submits; otherwise the key is (or is
    being) used, for `digest`, and `uuid` is its task once there is one."""

    mine: bool
    digest: str
    uuid: str | None = None
    failure: str | None = None  # the first attempt's upstream outcome is unknown: replay that, never resubmit
    claimed_at: float = 0.0  # when the attempt holding it began
    boot: str = ""  # the process that holds it (its start's token)


@dataclass
class TaskRecord:
    uuid: str
    key: str
    client: str
    model: str
    width: int
    height: int
    batch_size: int
    steps: int
    prompt: str | None
    negative_prompt: str | None
    submitted_at: float
    finished_at: float | None = None
    status: str = "submitted"
    image_count: int | None = None
    error: str | None = None
    image_urls: list[str] = field(default_factory=list)
    end_user: str | None = None  # OpenAI's `user`: the caller's own end user
    webhook_url: str | None = None  # where the task's events are sent (webhooks.py)
    webhook_events: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# A webhook message's states: waiting for its next attempt, done, given up, or never to be sent
# because its URL was disabled (the receiver answered 410 Gone).
PENDING, DELIVERED, FAILED, DISABLED = "pending", "delivered", "failed", "disabled"
WEBHOOK_STATES = (PENDING, DELIVERED, FAILED, DISABLED)
NOT_SENT_DISABLED = "not sent: the URL answered 410 Gone to an earlier message"


@dataclass
class WebhookMessage:
    """One event of one task for one URL, stored before its first attempt (the outbox), and its
    delivery so far. `body` is the exact JSON sent (and signed) on every attempt."""

    id: str
    key: str
    task: str
    type: str
    url: str
    body: str
    created_at: float
    status: str = PENDING
    attempts: int = 0
    next_at: float | None = None  # when it is due (a claimed one: when its lease ends)
    last_status: int | None = None  # the receiver's last HTTP status
    last_error: str | None = None  # the gateway's own words for the last failure, never the receiver's
    delivered_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Notice:
    """A task's final event, handed to finish_task: stored as a message in the same write when
    the task's webhook asked for this type of event (the outbox is transactional)."""

    id: str
    type: str
    body: str
    created_at: float


# A task's submit time as recorded: to 100 microseconds, a value that every store keeps exactly
# (Redis' Lua cjson writes numbers with 14 significant digits, sorted-set scores with 17), so
# that a page's cursor and the order agree; ties are broken by uuid.
TIME_DIGITS = 4


def recorded_time(now: float) -> float:
    return round(now, TIME_DIGITS)


@dataclass(frozen=True)
class TaskQuery:
    """Which recorded tasks: filters (None: any), newest first, a page at a time."""

    key: str | None = None
    status: str | None = None
    since: str | None = None  # first UTC day, YYYY-MM-DD
    until: str | None = None  # last UTC day, included
    before: float | None = None  # only tasks submitted before this (the previous page's last)
    before_uuid: str | None = None  # and, submitted at the same moment, with a uuid before this one
    limit: int = 50
    end_user: str | None = None


@dataclass(frozen=True)
class UsageRow:
    key: str
    day: str
    tasks: int = 0
    images: int = 0
    failed: int = 0
    refused: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def decide(plan: Plan, images: int, now: float, day: str, recent: int, oldest: float | None,
           used: int) -> Admission:
    """One submit of `images` against `plan`, given the scope's requests within the last minute
    (`recent`, the `oldest` of them) and the images it used today. Every store decides with this."""
    requests = quota = None
    rate_full = bool(plan.requests_per_minute) and recent >= plan.requests_per_minute
    if plan.requests_per_minute:
        # full: room again when the oldest request leaves the window; else all clear a minute on
        requests = (Window(plan.requests_per_minute, 0, (oldest or now) + MINUTE - now) if rate_full
                    else Window(plan.requests_per_minute, plan.requests_per_minute - recent - 1, MINUTE))
    quota_spent = bool(plan.images_per_day) and used + images > plan.images_per_day
    if plan.images_per_day:
        left = plan.images_per_day - used - (0 if quota_spent else images)
        quota = Window(plan.images_per_day, max(0, left), seconds_to_midnight(now))
    if quota_spent and quota is not None:  # the lasting reason first: retrying within the minute cannot help
        return Admission(False, "insufficient_quota", requests, quota, quota.reset, day)
    if rate_full and requests is not None:
        return Admission(False, "rate_limit_exceeded", requests, quota, requests.reset, day)
    return Admission(True, None, requests, quota, None, day)


class RateWindows:
    """Each scope's hits within the last minute, in memory. Scopes are kept in order of their last
    hit, so the ones that went quiet are swept from the front as they expire: a hit costs the same
    with 10 or 200,000 scopes seen (no scan), and the map holds only the last minute's scopes."""

    def __init__(self) -> None:
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hits)

    def recent(self, scope: str, now: float) -> tuple[int, float | None]:
        """The scope's hits within the last minute, and the oldest of them."""
        self._sweep(now)
        hits = self._hits.get(scope)
        if not hits:
            return 0, None
        while hits and hits[0] <= now - MINUTE:
            hits.popleft()
        return len(hits), hits[0] if hits else None

    def add(self, scope: str, now: float) -> None:
        self._hits.setdefault(scope, deque()).append(now)
        self._hits.move_to_end(scope)

    def forget(self, scope: str, now: float) -> None:
        """Takes back a hit that was not committed."""
        hits = self._hits.get(scope)
        if hits and now in hits:
            hits.remove(now)

    def _sweep(self, now: float) -> None:
        while self._hits:
            scope, hits = next(iter(self._hits.items()))
            if hits and hits[-1] > now - MINUTE:
                return
            del self._hits[scope]


class StoreUnavailable(Exception):
    """The store cannot write (or did not answer in time): nothing may be submitted unmetered."""


class NotRecorded(StoreUnavailable):
    """The upstream accepted task `uuid`, but its record could not be committed. The store keeps
    the write and retries it; the client must be told the task exists, not to resubmit."""

    def __init__(self, uuid: str, cause: StoreUnavailable) -> None:
        super().__init__(str(cause))
        self.uuid = uuid


# A task the gateway stopped following before it ended (follow_budget): its record's final word.
EXPIRED = "expired"
SUBMITTED = "submitted"


class Store(abc.ABC):
    """What the gateway keeps; see the module's docstring. `now` is passed in (an injectable
    clock), so that day boundaries are testable."""

    name = "store"
    dropped = 0  # writes made after an answer and lost to an overflow of the retry queue
    _reads: RateWindows | None = None  # admit_read's windows, made on first use
    @abc.abstractmethod
    def open(self) -> None:
        """Starts opening (and creating or migrating) what it needs; operations wait for it."""

    @abc.abstractmethod
    async def ready(self) -> None:
        """Returns once open; raises StoreUnavailable, with the reason, if it cannot be."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Writes what is pending, then closes."""

    @abc.abstractmethod
    async def admit(self, scope: str, plan: Plan, images: int, now: float) -> Admission:
        """Checks and counts one submit of `images` against the scope's rate window and daily
        quota, in one step: a refused submit counts against neither. Asked for every submit, with
        limits or not: an allowed one is committed before it returns, so that a store that cannot
        write stops the submit (StoreUnavailable) before the upstream sees it."""

    @abc.abstractmethod
    async def refund(self, scope: str, day: str, images: int, ticket: int | None = None) -> None:
        """Gives back images reserved by admit() for a job the upstream certainly refused."""

    @abc.abstractmethod
    async def claim(self, scope: str, key: str, digest: str, ttl: float, now: float, boot: str) -> Claim:
        """Claims an Idempotency-Key for a submit by process `boot`, for `ttl` seconds, or tells
        who has it (and since when: an attempt that never ended is known by it)."""

    @abc.abstractmethod
    async def fulfil(self, scope: str, key: str, uuid: str | None, ttl: float, now: float,
                     failure: str | None = None) -> None:
        """The claimed key's submit made task `uuid`, or ended with an outcome that must be
        replayed (`failure`: the upstream's outcome is unknown). Committed before it returns; if
        it cannot be, it raises StoreUnavailable and keeps the write to retry."""

    @abc.abstractmethod
    async def release(self, scope: str, key: str) -> None:
        """The claimed key's submit failed: the key may be used again."""

    @abc.abstractmethod
    async def record_task(self, record: TaskRecord, ticket: int | None = None) -> None:
        """A submitted task: its usage row, which also records who owns it. Committed before it
        returns; if it cannot be, it raises StoreUnavailable and keeps the write to retry."""

    @abc.abstractmethod
    async def finish_task(self, uuid: str, status: str, finished_at: float, image_count: int,
                          error: str | None, image_urls: list[str], notice: Notice | None = None) -> None:
        """A task's final state, once the gateway sees it (kept and retried). An `expired` row may
        still learn its real end later. With `notice`, in the same write: a webhook message to
        the task's webhook, if it has one and asked for this event."""

    # -- webhook messages (the outbox) ----------------------------------------------------------

    @abc.abstractmethod
    async def add_webhook(self, message: WebhookMessage) -> None:
        """A new message (a task.progress event): stored, kept and retried until it lands."""

    @abc.abstractmethod
    async def claim_webhooks(self, now: float, limit: int, lease: float) -> list[WebhookMessage]:
        """Up to `limit` pending messages due by `now`, each leased for `lease` seconds (its due
        time moved on): in a fleet, one instance at a time sends a message. A due message whose
        URL was disabled for its key (410) is settled as disabled instead."""

    @abc.abstractmethod
    async def webhook_attempted(self, message: WebhookMessage) -> None:
        """An attempt's outcome (status, attempts, next_at, last_status, last_error, delivered_at);
        committed before it returns, or kept and retried."""

    @abc.abstractmethod
    async def find_webhooks(self, key: str | None, status: str | None, limit: int) -> list[WebhookMessage]:
        """Messages, newest first, filtered by key and status."""

    @abc.abstractmethod
    async def get_webhook(self, message_id: str) -> WebhookMessage | None:
        """One message."""

    @abc.abstractmethod
    async def retry_webhook(self, message_id: str, now: float) -> WebhookMessage | None:
        """An admin's retry: the message is pending and due now (its URL enabled again for its key)."""

    @abc.abstractmethod
    async def disable_url(self, key: str, url: str, now: float) -> None:
        """A receiver answered 410 Gone: this key's messages to `url` are not sent any more."""

    @abc.abstractmethod
    async def url_disabled(self, key: str, url: str) -> bool:
        """Whether disable_url() was called for this key and URL (and no retry enabled it again)."""

    @abc.abstractmethod
    async def webhook_backlog(self) -> tuple[int, float | None]:
        """Pending messages, and when the oldest of them was created."""

    @abc.abstractmethod
    async def unfinished(self, limit: int) -> list[tuple[str, float]]:
        """(uuid, submitted_at) of recorded tasks not yet known to have ended, oldest first."""

    @abc.abstractmethod
    async def owner(self, uuid: str) -> str | None:
        """The key name that submitted `uuid` through this gateway, or None."""

    @abc.abstractmethod
    async def count_refusal(self, key: str, reason: str, now: float) -> None:
        """A submit refused before it reached the upstream (rate, quota, waiters)."""

    @abc.abstractmethod
    async def usage(self, since: str, until: str, key: str | None = None) -> list[UsageRow]:
        """Per key and UTC day (YYYY-MM-DD, both ends included)."""

    async def end_user_usage(self, since: str, until: str, key: str | None = None) -> list[dict[str, Any]]:
        """Tasks, images and failures per end user (OpenAI's `user`) and UTC day, from the task
        rows (tasks submitted without a `user` are under null)."""
        rows: dict[tuple[str | None, str], dict[str, Any]] = {}
        page = await self.find_tasks(TaskQuery(key=key, since=since, until=until, limit=END_USER_SCAN))
        for task in page:
            day = utc_day(task.submitted_at)
            row = rows.setdefault((task.end_user, day), {"end_user": task.end_user, "day": day, "tasks": 0,
                                                         "images": 0, "failed": 0})
            row["tasks"] += 1
            row["images"] += task.batch_size
            row["failed"] += task.status == "failed"
        return sorted(rows.values(), key=lambda r: (r["end_user"] or "", r["day"]))

    @abc.abstractmethod
    async def find_tasks(self, query: TaskQuery) -> list[TaskRecord]:
        """Recorded tasks that match `query`, newest first."""

    @abc.abstractmethod
    async def get_task(self, uuid: str) -> TaskRecord | None:
        """One recorded task."""

    async def recent_tasks(self, key: str | None, limit: int) -> list[TaskRecord]:
        """The most recent tasks, newest first."""
        return await self.find_tasks(TaskQuery(key=key, limit=limit))

    @abc.abstractmethod
    async def last_seen(self, keys: list[str]) -> dict[str, float]:
        """When each of `keys` last submitted a task that is still recorded."""

    @abc.abstractmethod
    async def secret(self, name: str, candidate: str) -> str:
        """The secret kept under `name`; the first caller's `candidate` becomes it (every process
        and instance sharing the store then agrees)."""

    async def admit_read(self, scope: str, per_minute: int, now: float) -> Admission:
        """One task read or picture download against `per_minute` (0: unlimited). Not durable, and
        counted per process here (a fleet's store counts for the whole fleet): reads cost the
        upstream nothing past the engine's one read per task per interval, so this limit guards
        the gateway and the fairness between keys, not money."""
        if not per_minute:
            return Admission(True)
        if self._reads is None:
            self._reads = RateWindows()
        windows = self._reads
        count, oldest = windows.recent(scope, now)
        admission = decide(Plan(requests_per_minute=per_minute), 0, now, utc_day(now), count, oldest, 0)
        if admission.allowed:
            windows.add(scope, now)
        return admission

    async def healthy(self) -> str | None:
        """None when usable, else why not (for /health/ready)."""
        return None
