"""The embedded store: one SQLite file (WAL), written by one thread of its own.

The IOLoop never touches the database. Every operation goes onto the writer's queue; the thread
takes everything queued at that moment, runs it in one transaction (each operation in a savepoint
of its own), commits, and only then wakes each waiting request (group commit: under load one
commit serves many requests, so durability costs a queue hop, not a commit per request).

What an answer depends on (admission with its journal entry, the task's row, Idempotency-Keys)
is awaited: a request is answered only once its writes are committed. With WAL and
`synchronous = NORMAL` a commit survives the process being killed; `synchronous = FULL` would
add surviving a power loss, at an fsync per commit. Writes nobody waits for (final states,
refusal counts, refunds) are kept by the thread when a commit fails and retried every second
until they land; only an overflow of that bounded list drops one, counted.

A commit that fails (disk full, read-only, I/O error, locked past busy_timeout) fails every
request waiting on it with StoreUnavailable, and the store reports itself unhealthy until a later
commit succeeds: the thread tries a small write every second meanwhile, so it recovers by itself.

Admission: a process that has the file to itself (`exclusive`, the default of one process)
decides on counters in memory, loaded from the database for each (scope, day) and written
through to it (committed before the submit goes on), so the database stays the truth across
restarts; the rate window (one minute) is not kept across a restart. Processes sharing the file
(`--processes`) decide in a `BEGIN IMMEDIATE` transaction instead, atomic across them. The schema
is created and migrated by `prepare()`, before any worker starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import queue
import sqlite3
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

from zimage_tornado.store import (DAY, DISABLED, EXPIRED, MINUTE, NOT_SENT_DISABLED, PENDING, SUBMITTED, Admission,
                                  Claim, Notice,
                                  RateWindows, Store, StoreUnavailable, TaskQuery, TaskRecord, UsageRow,
                                  WebhookMessage, day_start, decide, utc_day)
from zimage_tornado.tenants import Plan

log = logging.getLogger("zimage_tornado.store")

Operation = Callable[[sqlite3.Connection], Any]

# Each entry moves the schema one version up; a database is brought to the last one at start.
MIGRATIONS = (
    """
    CREATE TABLE tasks (
        uuid TEXT PRIMARY KEY, key TEXT NOT NULL, client TEXT, model TEXT, width INTEGER, height INTEGER,
        batch_size INTEGER, steps INTEGER, prompt TEXT, negative_prompt TEXT, submitted_at REAL NOT NULL,
        finished_at REAL, status TEXT NOT NULL, image_count INTEGER, error TEXT, image_urls TEXT);
    CREATE INDEX tasks_by_time ON tasks (submitted_at);
    CREATE INDEX tasks_by_key ON tasks (key, submitted_at);
    CREATE TABLE quota (scope TEXT NOT NULL, day TEXT NOT NULL, images INTEGER NOT NULL,
                        PRIMARY KEY (scope, day));
    CREATE TABLE hits (scope TEXT NOT NULL, at REAL NOT NULL);
    CREATE INDEX hits_by_scope ON hits (scope, at);
    CREATE TABLE refusals (key TEXT NOT NULL, day TEXT NOT NULL, reason TEXT NOT NULL, count INTEGER NOT NULL,
                           PRIMARY KEY (key, day, reason));
    CREATE TABLE idempotency (scope TEXT NOT NULL, key TEXT NOT NULL, digest TEXT NOT NULL, uuid TEXT,
                              expires REAL NOT NULL, PRIMARY KEY (scope, key));
    """,
    # The journal of submits between admission and their task's row (one left behind is a submit
    # whose outcome is unknown); an Idempotency-Key bound to such an outcome; unfinished tasks.
    """
    CREATE TABLE submits (id INTEGER PRIMARY KEY, scope TEXT NOT NULL, started_at REAL NOT NULL);
    ALTER TABLE idempotency ADD COLUMN failure TEXT;
    CREATE INDEX tasks_by_status ON tasks (status, submitted_at);
    CREATE TABLE health (id INTEGER PRIMARY KEY, at REAL NOT NULL);
    """,
    # OpenAI's `user` of a submit: who the caller drew for
    """
    ALTER TABLE tasks ADD COLUMN end_user TEXT;
    CREATE INDEX tasks_by_end_user ON tasks (end_user, submitted_at);
    """,
    # Webhooks: a task's subscription, the outbox of messages and their delivery, URLs gone (410)
    """
    ALTER TABLE tasks ADD COLUMN webhook_url TEXT;
    ALTER TABLE tasks ADD COLUMN webhook_events TEXT;
    CREATE TABLE webhooks (id TEXT PRIMARY KEY, key TEXT NOT NULL, task TEXT NOT NULL, type TEXT NOT NULL,
                           url TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL, status TEXT NOT NULL,
                           attempts INTEGER NOT NULL, next_at REAL, last_status INTEGER, last_error TEXT,
                           delivered_at REAL, leased INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX webhooks_due ON webhooks (status, next_at);
    CREATE INDEX webhooks_by_key ON webhooks (key, created_at);
    CREATE INDEX webhooks_by_time ON webhooks (created_at);
    CREATE TABLE webhook_disabled (key TEXT NOT NULL, url TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (key, url));
    """,
    # An Idempotency-Key's attempt: when it began and which process runs it (a crash leaves it unended)
    """
    ALTER TABLE idempotency ADD COLUMN claimed_at REAL;
    ALTER TABLE idempotency ADD COLUMN boot TEXT;
    """,
    # Secrets the gateway makes for itself (the key that signs picture links)
    """
    CREATE TABLE secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)
MAX_QUEUED = 100_000  # operations waiting for the writer: past this, the disk is not keeping up
MAX_KEPT = 100_000  # writes nobody waits for, kept across failed commits: past this one is dropped
RETRY_SECONDS = 1.0  # while failing: how often kept writes (or a probe) are tried again
BATCH = 1000
SWITCH_INTERVAL = 0.0002  # seconds a thread may hold the GIL while another waits (Python's default: 0.005)
TASK_COLUMNS = ("uuid", "key", "client", "model", "width", "height", "batch_size", "steps", "prompt",
                "negative_prompt", "submitted_at", "finished_at", "status", "image_count", "error", "image_urls",
                "end_user", "webhook_url", "webhook_events")
WEBHOOK_COLUMNS = tuple(f.name for f in dataclasses.fields(WebhookMessage))
# SQLite's primary result codes that mean the database, not one operation, failed: the whole
# commit is given up (and its writes kept), never half of it.
DATABASE_FAILURES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})  # BUSY LOCKED NOMEM READONLY IOERR
#                                                                      CORRUPT FULL CANTOPEN PROTOCOL NOTADB


class _Retry(Exception):
    """One operation failed on its own: the transaction runs again without it."""


@dataclasses.dataclass
class Item:
    operation: Operation
    future: asyncio.Future[Any] | None = None  # None: nobody waits for it (kept and retried on failure)
    keep: bool = False  # awaited, and also kept and retried if its commit fails


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")  # other processes sharing the file
    if path != ":memory:":
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across a crash of the process
    return conn


def prepare(path: str) -> int:
    """Creates or migrates the schema; the supervisor calls it once before forking workers, so
    that they never race to migrate ("database is locked" at start)."""
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        version = migrate(conn)
        conn.execute("COMMIT")
        return version
    finally:
        conn.close()


def is_database_failure(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return code is None or (code & 0xFF) in DATABASE_FAILURES


class SqliteStore(Store):
    name = "sqlite"

    def __init__(self, path: str, *, record_ttl: float, clock: Callable[[], float] = time.time,
                 exclusive: bool = True) -> None:
        self.path = path
        self.record_ttl = record_ttl
        self.clock = clock
        self.exclusive = exclusive
        # SimpleQueue: one C-level lock per put and get (queue.Queue takes a lock and a condition
        # in Python on each side: a measurable part of a submit's CPU with two commits per submit).
        # The IOLoop hands over what one of its iterations wrote as one list: the writer wakes once
        # for all of them and commits them together (fewer wake-ups, GIL hand-offs and commits).
        self._queue: queue.SimpleQueue[list[Item] | None] = queue.SimpleQueue()
        self._pending: list[Item] = []  # written in this IOLoop iteration, handed over at its end
        self._handed = 0  # operations handed to the writer (counted by the IOLoop thread only)
        self._taken = 0  # operations the writer took (counted by the writer thread only)
        self._hits = RateWindows()  # exclusive: each scope's requests within the last minute
        self._used: dict[str, int] = {}  # exclusive: images counted per scope on `_used_day`
        self._used_day = ""
        self._thread: threading.Thread | None = None
        self._migrated: concurrent.futures.Future[int] = concurrent.futures.Future()
        self.failing: str | None = None  # why the last commit failed, until one succeeds
        self.kept = 0  # writes waiting to be retried (read by /health/ready and the metrics)

    # -- the writer thread -------------------------------------------------------------------

    def open(self) -> None:
        # The writer gives up the GIL in every SQLite call and must get it back from a busy IOLoop,
        # which by default holds it for up to 5 ms: a commit would wait that long several times.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._run, name="zimage-sqlite", daemon=True)
        self._thread.start()

    async def ready(self) -> None:
        version = await asyncio.wrap_future(self._migrated)
        log.info("store: SQLite %s (schema version %d)", self.path, version)

    async def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._hand_over()
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    async def healthy(self) -> str | None:
        if self._migrated.done() and self._migrated.exception() is not None:
            return str(self._migrated.exception())
        if self._thread is None or not self._thread.is_alive():
            return "the SQLite writer has stopped"
        if self.failing is not None:
            return "the SQLite database %s cannot be written: %s" % (self.path, self.failing)
        return None

    def _run(self) -> None:
        try:
            conn = connect(self.path)
            conn.execute("BEGIN IMMEDIATE")
            version = migrate(conn)
            if self.exclusive:  # nobody else sends: a message leased when the last process died is due now
                conn.execute("UPDATE webhooks SET next_at = ?, leased = 0 WHERE leased = 1", (self.clock(),))
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._migrated.set_exception(StoreUnavailable("database %s: %s" % (self.path, e)))
            self._fail_all()
            return
        self._migrated.set_result(version)
        kept: deque[Item] = deque()
        next_sweep = 0.0
        while True:
            try:
                # While commits fail, wake every RETRY_SECONDS: kept writes (and a probe) try again.
                items: list[Item] | None = self._queue.get(timeout=RETRY_SECONDS if kept or self.failing else None)
                probing = False
            except queue.Empty:
                items, probing = [], True
            stopping = items is None
            batch = [] if items is None else items
            while not stopping and len(batch) < BATCH:
                try:
                    items = self._queue.get_nowait()
                except queue.Empty:
                    break
                if items is None:
                    stopping = True  # finish this batch, then stop
                else:
                    batch += items
            self._taken += len(batch)  # what was handed over: the probe and the sweep never were
            if probing:
                batch.append(Item(probe))
            if time.monotonic() >= next_sweep:
                batch.append(Item(self._sweep))
                next_sweep = time.monotonic() + MINUTE
            self._execute(conn, batch, kept)
            if stopping:
                break
        conn.close()

    def _execute(self, conn: sqlite3.Connection, batch: list[Item], kept: deque[Item]) -> None:
        """Runs the kept writes and then `batch` in one transaction; wakes their callers after the
        commit. On a database failure, none of it happened: callers get StoreUnavailable, writes
        nobody waits for (and `keep` ones) are kept for the next try."""
        work = list(kept) + batch
        kept.clear()
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            results = self._transaction(conn, work)
            if self.failing is not None:
                log.warning("store: SQLite %s can be written again", self.path)
            self.failing = None
        except sqlite3.Error as e:  # the database itself failed (disk full, read-only, locked past busy_timeout)
            if self.failing is None:
                log.error("store: SQLite %s cannot be written (%s); submits are refused until it can", self.path, e)
            self.failing = str(e)
            failure = StoreUnavailable("The usage database cannot be written (%s)" % e)
            results = [(item.future, None, failure) for item in work if item.future is not None]
            for item in work:
                if item.future is None or item.keep:
                    if len(kept) < MAX_KEPT:
                        kept.append(Item(item.operation))
                    else:
                        self.dropped += 1
                        log.error("store: more than %d writes wait for the database; one was dropped", MAX_KEPT)
        self.kept = len(kept)
        if results:
            results[0][0].get_loop().call_soon_threadsafe(_settle, results)

    @staticmethod
    def _transaction(conn: sqlite3.Connection,
                     work: list[Item]) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """`work` in one committed transaction. An operation that fails on its own (a bug, not the
        database) is taken out and the rest run again without it: no savepoint per operation, whose
        statements would cost every commit, for a failure that should never happen."""
        refused: dict[int, BaseException] = {}
        while True:
            results = []
            try:
                conn.execute("BEGIN IMMEDIATE")
                for index, item in enumerate(work):
                    if index in refused:
                        result, error = None, refused[index]
                    else:
                        try:
                            result, error = item.operation(conn), None
                        except sqlite3.Error as e:
                            if is_database_failure(e):
                                raise
                            log.error("store: a write failed: %s", e)
                            refused[index] = StoreUnavailable("The usage database refused a write")
                            raise _Retry() from e
                    if item.future is not None:
                        results.append((item.future, result, error))
                conn.execute("COMMIT")
                return results
            except _Retry:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the transaction is gone with the failure
                raise

    def _fail_all(self) -> None:
        """The database could not be opened: every queued and later caller is told so."""
        while True:
            items = self._queue.get()
            if items is None:
                return
            for item in items:
                future = item.future
                if future is not None and not future.done():
                    failed: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = [
                        (future, None, StoreUnavailable("The usage database is unavailable"))]
                    future.get_loop().call_soon_threadsafe(_settle, failed)

    def _sweep(self, conn: sqlite3.Connection) -> None:
        """Keeps what can grow bounded: expired hits, claims and keys, old quota days and rows."""
        now = self.clock()
        conn.execute("DELETE FROM hits WHERE at <= ?", (now - MINUTE,))
        conn.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))
        conn.execute("DELETE FROM quota WHERE day < ?", (utc_day(now - DAY),))
        conn.execute("DELETE FROM tasks WHERE submitted_at < ?", (now - self.record_ttl,))
        conn.execute("DELETE FROM refusals WHERE day < ?", (utc_day(now - self.record_ttl),))
        conn.execute("DELETE FROM submits WHERE started_at < ?", (now - self.record_ttl,))
        conn.execute("DELETE FROM webhooks WHERE created_at < ?", (now - self.record_ttl,))

    async def _call(self, operation: Operation, keep: bool = False) -> Any:
        """Runs `operation` in the next commit and returns its result once committed."""
        loop = asyncio.get_running_loop()
        if self._backlog() >= MAX_QUEUED:
            raise StoreUnavailable("The usage database is not keeping up")
        future: asyncio.Future[Any] = loop.create_future()
        self._enqueue(Item(operation, future, keep), loop)
        return await future

    def _send(self, operation: Operation) -> None:
        """A write nobody waits for: it goes with the next commit, and is retried until it lands."""
        if self._backlog() >= MAX_QUEUED:
            self.dropped += 1
            log.error("store: the database is not keeping up; a write was dropped")
            return
        self._enqueue(Item(operation), asyncio.get_running_loop())

    def _backlog(self) -> int:
        """Operations written and not yet taken by the writer."""
        return self._handed + len(self._pending) - self._taken

    def _enqueue(self, item: Item, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pending:
            loop.call_soon(self._hand_over)  # after everything else ready in this iteration
        self._pending.append(item)

    def _hand_over(self) -> None:
        if self._pending:
            items, self._pending = self._pending, []
            self._handed += len(items)
            self._queue.put(items)

    # -- the interface ------------------------------------------------------------------------

    async def admit(self, scope: str, plan: Plan, images: int, now: float) -> Admission:
        if not self.exclusive:
            return await self._call(lambda conn: admit(conn, scope, plan, images, now))
        day = utc_day(now)
        if day != self._used_day:  # a new UTC day: yesterday's counts go at once, no scan
            self._used, self._used_day = {}, day
        if plan.images_per_day and scope not in self._used:
            used = await self._call(lambda conn: images_used(conn, scope, day))
            if day == self._used_day:
                self._used.setdefault(scope, used)  # setdefault: another admit may have loaded it
        count, oldest = self._hits.recent(scope, now)
        admission = decide(plan, images, now, day, count, oldest, self._used.get(scope, 0))
        if not admission.allowed:
            return admission
        # Counted in memory first (a concurrent admit sees it), committed before the submit goes on.
        counted = images if plan.images_per_day else 0
        if plan.requests_per_minute:
            self._hits.add(scope, now)
        if counted:
            self._used[scope] = self._used.get(scope, 0) + counted
        try:
            ticket = await self._call(lambda conn: begin_submit(conn, scope, day, counted, now))
        except StoreUnavailable:  # not committed: not counted
            self._hits.forget(scope, now)
            if counted and day == self._used_day and scope in self._used:
                self._used[scope] -= counted
            raise
        return dataclasses.replace(admission, ticket=ticket)

    async def refund(self, scope: str, day: str, images: int, ticket: int | None = None) -> None:
        if day == self._used_day and scope in self._used:
            self._used[scope] = max(0, self._used[scope] - images)

        def refund(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE quota SET images = MAX(0, images - ?) WHERE scope = ? AND day = ?",
                         (images, scope, day))
            conn.execute("DELETE FROM submits WHERE id = ?", (ticket,))
        self._send(refund)

    async def claim(self, scope: str, key: str, digest: str, ttl: float, now: float, boot: str) -> Claim:
        def claim(conn: sqlite3.Connection) -> Claim:
            row = conn.execute("SELECT digest, uuid, failure, claimed_at, boot FROM idempotency "
                               "WHERE scope = ? AND key = ? AND expires > ?", (scope, key, now)).fetchone()
            if row is not None:
                return Claim(False, row[0], row[1], row[2], row[3] or 0.0, row[4] or "")
            conn.execute("INSERT OR REPLACE INTO idempotency (scope, key, digest, uuid, expires, failure, claimed_at, "
                         "boot) VALUES (?, ?, ?, NULL, ?, NULL, ?, ?)", (scope, key, digest, now + ttl, now, boot))
            return Claim(True, digest, claimed_at=now, boot=boot)
        return await self._call(claim)

    async def fulfil(self, scope: str, key: str, uuid: str | None, ttl: float, now: float,
                     failure: str | None = None) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE idempotency SET uuid = ?, failure = ?, expires = ? WHERE scope = ? AND key = ?",
            (uuid, failure, now + ttl, scope, key)), keep=True)

    async def release(self, scope: str, key: str) -> None:
        self._send(lambda conn: conn.execute(
            "DELETE FROM idempotency WHERE scope = ? AND key = ? AND uuid IS NULL AND failure IS NULL", (scope, key)))

    async def record_task(self, record: TaskRecord, ticket: int | None = None) -> None:
        row = {**record.as_dict(), "image_urls": json.dumps(record.image_urls),
               "webhook_events": None if record.webhook_events is None else json.dumps(record.webhook_events)}
        values = tuple(row[column] for column in TASK_COLUMNS)

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO tasks (%s) VALUES (%s)"
                         % (", ".join(TASK_COLUMNS), ", ".join("?" * len(values))), values)
            if ticket is not None:
                conn.execute("DELETE FROM submits WHERE id = ?", (ticket,))
        await self._call(insert, keep=True)

    async def finish_task(self, uuid: str, status: str, finished_at: float, image_count: int,
                          error: str | None, image_urls: list[str], notice: Notice | None = None) -> None:
        urls = json.dumps(image_urls)

        def finish(conn: sqlite3.Connection) -> None:
            changed = conn.execute(
                "UPDATE tasks SET status = ?, finished_at = ?, image_count = ?, error = ?, image_urls = ? "
                "WHERE uuid = ? AND (finished_at IS NULL OR status = ?)",
                (status, finished_at, image_count, error, urls, uuid, EXPIRED)).rowcount
            if changed and notice is not None:  # the task's end and its message: one commit
                row = conn.execute("SELECT key, webhook_url, webhook_events FROM tasks WHERE uuid = ?",
                                   (uuid,)).fetchone()
                if row is not None and row[1] and notice.type in json.loads(row[2] or "[]"):
                    insert_webhook(conn, WebhookMessage(notice.id, row[0], uuid, notice.type, row[1], notice.body,
                                                        notice.created_at, next_at=notice.created_at))
        self._send(finish)

    # -- webhook messages -------------------------------------------------------------------

    async def add_webhook(self, message: WebhookMessage) -> None:
        self._send(lambda conn: insert_webhook(conn, message))

    async def claim_webhooks(self, now: float, limit: int, lease: float) -> list[WebhookMessage]:
        def claim(conn: sqlite3.Connection) -> list[WebhookMessage]:
            # a message to a URL disabled (410) since it was written is settled here, never sent
            conn.execute("UPDATE webhooks SET status = ?, next_at = NULL, last_error = ? WHERE status = ? AND "
                         "next_at <= ? AND EXISTS (SELECT 1 FROM webhook_disabled d WHERE d.key = webhooks.key "
                         "AND d.url = webhooks.url)", (DISABLED, NOT_SENT_DISABLED, PENDING, now))
            rows = conn.execute("SELECT %s FROM webhooks WHERE status = ? AND next_at <= ? ORDER BY next_at LIMIT ?"
                                % ", ".join(WEBHOOK_COLUMNS), (PENDING, now, limit)).fetchall()
            messages = [WebhookMessage(**dict(zip(WEBHOOK_COLUMNS, row))) for row in rows]
            conn.executemany("UPDATE webhooks SET next_at = ?, leased = 1 WHERE id = ?",
                             [(now + lease, message.id) for message in messages])
            return messages
        return await self._call(claim)

    async def webhook_attempted(self, message: WebhookMessage) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE webhooks SET status = ?, attempts = ?, next_at = ?, last_status = ?, last_error = ?, "
            "delivered_at = ?, leased = 0 WHERE id = ?",
            (message.status, message.attempts, message.next_at, message.last_status, message.last_error,
             message.delivered_at, message.id)), keep=True)

    async def find_webhooks(self, key: str | None, status: str | None, limit: int) -> list[WebhookMessage]:
        clauses = [(c, v) for c, v in (("key = ?", key), ("status = ?", status)) if v is not None]
        where = ("WHERE " + " AND ".join(c for c, _ in clauses)) if clauses else ""

        def find(conn: sqlite3.Connection) -> list[WebhookMessage]:
            rows = conn.execute("SELECT %s FROM webhooks %s ORDER BY created_at DESC LIMIT ?"
                                % (", ".join(WEBHOOK_COLUMNS), where), (*(v for _, v in clauses), limit))
            return [WebhookMessage(**dict(zip(WEBHOOK_COLUMNS, row))) for row in rows]
        return await self._call(find)

    async def get_webhook(self, message_id: str) -> WebhookMessage | None:
        def get(conn: sqlite3.Connection) -> WebhookMessage | None:
            row = conn.execute("SELECT %s FROM webhooks WHERE id = ?" % ", ".join(WEBHOOK_COLUMNS),
                               (message_id,)).fetchone()
            return None if row is None else WebhookMessage(**dict(zip(WEBHOOK_COLUMNS, row)))
        return await self._call(get)

    async def retry_webhook(self, message_id: str, now: float) -> WebhookMessage | None:
        def retry(conn: sqlite3.Connection) -> WebhookMessage | None:
            conn.execute("UPDATE webhooks SET status = ?, next_at = ?, leased = 0 WHERE id = ?",
                         (PENDING, now, message_id))
            row = conn.execute("SELECT %s FROM webhooks WHERE id = ?" % ", ".join(WEBHOOK_COLUMNS),
                               (message_id,)).fetchone()
            if row is None:
                return None
            message = WebhookMessage(**dict(zip(WEBHOOK_COLUMNS, row)))
            conn.execute("DELETE FROM webhook_disabled WHERE key = ? AND url = ?", (message.key, message.url))
            return message
        return await self._call(retry)

    async def disable_url(self, key: str, url: str, now: float) -> None:
        def disable(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO webhook_disabled (key, url, at) VALUES (?, ?, ?)", (key, url, now))
            conn.execute("UPDATE webhooks SET status = ?, next_at = NULL, last_error = ? WHERE key = ? AND url = ? "
                         "AND status = ?", (DISABLED, NOT_SENT_DISABLED, key, url, PENDING))
        await self._call(disable, keep=True)

    async def url_disabled(self, key: str, url: str) -> bool:
        return bool(await self._call(lambda conn: conn.execute(
            "SELECT 1 FROM webhook_disabled WHERE key = ? AND url = ?", (key, url)).fetchone()))

    async def webhook_backlog(self) -> tuple[int, float | None]:
        count, oldest = await self._call(lambda conn: conn.execute(
            "SELECT COUNT(*), MIN(created_at) FROM webhooks WHERE status = ?", (PENDING,)).fetchone())
        return int(count), None if oldest is None else float(oldest)

    async def unfinished(self, limit: int) -> list[tuple[str, float]]:
        return await self._call(lambda conn: [(str(uuid), float(at)) for uuid, at in conn.execute(
            "SELECT uuid, submitted_at FROM tasks WHERE status = ? ORDER BY submitted_at LIMIT ?",
            (SUBMITTED, limit))])

    async def owner(self, uuid: str) -> str | None:
        def owner(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT key FROM tasks WHERE uuid = ?", (uuid,)).fetchone()
            return None if row is None else str(row[0])
        return await self._call(owner)

    async def count_refusal(self, key: str, reason: str, now: float) -> None:
        self._send(lambda conn: conn.execute(
            "INSERT INTO refusals (key, day, reason, count) VALUES (?, ?, ?, 1) "
            "ON CONFLICT (key, day, reason) DO UPDATE SET count = count + 1", (key, utc_day(now), reason)))

    async def usage(self, since: str, until: str, key: str | None = None) -> list[UsageRow]:
        return await self._call(lambda conn: usage(conn, since, until, key))

    async def find_tasks(self, query: TaskQuery) -> list[TaskRecord]:
        where, args = task_filter(query)

        def find(conn: sqlite3.Connection) -> list[TaskRecord]:
            rows = conn.execute("SELECT %s FROM tasks %s ORDER BY submitted_at DESC, uuid DESC LIMIT ?"
                                % (", ".join(TASK_COLUMNS), where), (*args, query.limit)).fetchall()
            return [record(dict(zip(TASK_COLUMNS, row))) for row in rows]
        return await self._call(find)

    async def end_user_usage(self, since: str, until: str, key: str | None = None) -> list[dict[str, Any]]:
        return await self._call(lambda conn: end_user_usage(conn, since, until, key))

    async def get_task(self, uuid: str) -> TaskRecord | None:
        def get(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute("SELECT %s FROM tasks WHERE uuid = ?" % ", ".join(TASK_COLUMNS), (uuid,)).fetchone()
            return None if row is None else record(dict(zip(TASK_COLUMNS, row)))
        return await self._call(get)

    async def last_seen(self, keys: list[str]) -> dict[str, float]:
        wanted = set(keys)
        return await self._call(lambda conn: {str(key): float(at) for key, at in conn.execute(
            "SELECT key, MAX(submitted_at) FROM tasks GROUP BY key") if key in wanted})

    async def secret(self, name: str, candidate: str) -> str:
        def secret(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)", (name, candidate))
            return str(conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0])
        return await self._call(secret)


def task_filter(query: TaskQuery) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause of a task query (values as parameters, never in the text)."""
    clauses, args = [], []
    for clause, value in (("key = ?", query.key), ("status = ?", query.status), ("end_user = ?", query.end_user),
                          ("submitted_at >= ?", day_start(query.since) if query.since else None),
                          ("submitted_at < ?", day_start(query.until) + DAY if query.until else None),
                          ("submitted_at < ?", query.before if query.before_uuid is None else None)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    if query.before is not None and query.before_uuid is not None:
        clauses.append("(submitted_at < ? OR (submitted_at = ? AND uuid < ?))")
        args += [query.before, query.before, query.before_uuid]
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def probe(conn: sqlite3.Connection) -> None:
    """A small real write: whether the database can be written again."""
    conn.execute("INSERT OR REPLACE INTO health (id, at) VALUES (1, ?)", (time.time(),))


def begin_submit(conn: sqlite3.Connection, scope: str, day: str, images: int, now: float) -> int:
    """An admitted submit: its images counted and its journal entry written, in one commit."""
    if images:
        add_images(conn, scope, day, images)
    cursor = conn.execute("INSERT INTO submits (scope, started_at) VALUES (?, ?)", (scope, now))
    return int(cursor.lastrowid or 0)


def record(row: dict[str, Any]) -> TaskRecord:
    row["image_urls"] = json.loads(row["image_urls"]) if row.get("image_urls") else []
    row["webhook_events"] = json.loads(row["webhook_events"]) if row.get("webhook_events") else None
    return TaskRecord(**row)


def insert_webhook(conn: sqlite3.Connection, message: WebhookMessage) -> None:
    values = message.as_dict()
    conn.execute("INSERT OR IGNORE INTO webhooks (%s) VALUES (%s)" % (", ".join(WEBHOOK_COLUMNS),
                                                                     ", ".join("?" * len(WEBHOOK_COLUMNS))),
                 tuple(values[column] for column in WEBHOOK_COLUMNS))


def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in results:
        if future.done():
            continue  # its caller left
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def migrate(conn: sqlite3.Connection) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    version = row[0] if row else 0
    for number, script in enumerate(MIGRATIONS[version:], version + 1):
        for statement in filter(str.strip, script.split(";")):
            conn.execute(statement)
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
    return len(MIGRATIONS)


def images_used(conn: sqlite3.Connection, scope: str, day: str) -> int:
    row = conn.execute("SELECT images FROM quota WHERE scope = ? AND day = ?", (scope, day)).fetchone()
    return int(row[0]) if row else 0


def add_images(conn: sqlite3.Connection, scope: str, day: str, images: int) -> None:
    conn.execute("INSERT INTO quota (scope, day, images) VALUES (?, ?, ?) "
                 "ON CONFLICT (scope, day) DO UPDATE SET images = images + excluded.images", (scope, day, images))


def admit(conn: sqlite3.Connection, scope: str, plan: Plan, images: int, now: float) -> Admission:
    """Admission for processes sharing the file: decided and counted in one transaction."""
    day = utc_day(now)
    conn.execute("DELETE FROM hits WHERE scope = ? AND at <= ?", (scope, now - MINUTE))
    count, oldest = conn.execute("SELECT COUNT(*), MIN(at) FROM hits WHERE scope = ?", (scope,)).fetchone()
    admission = decide(plan, images, now, day, count, oldest, images_used(conn, scope, day))
    if not admission.allowed:
        return admission
    if plan.requests_per_minute:
        conn.execute("INSERT INTO hits (scope, at) VALUES (?, ?)", (scope, now))
    counted = images if plan.images_per_day else 0
    return dataclasses.replace(admission, ticket=begin_submit(conn, scope, day, counted, now))


def end_user_usage(conn: sqlite3.Connection, since: str, until: str, key: str | None) -> list[dict[str, Any]]:
    """Tasks, images and failures per end user and UTC day, in SQL."""
    where, args = ("AND key = ?", (key,)) if key else ("", ())
    return [{"end_user": user, "day": day, "tasks": tasks, "images": images or 0, "failed": failed or 0}
            for user, day, tasks, images, failed in conn.execute(
                "SELECT end_user, date(submitted_at, 'unixepoch'), COUNT(*), SUM(batch_size), SUM(status = 'failed') "
                "FROM tasks WHERE submitted_at >= ? AND submitted_at < ? %s GROUP BY 1, 2 ORDER BY 1, 2" % where,
                (day_start(since), day_start(until) + DAY, *args))]


def usage(conn: sqlite3.Connection, since: str, until: str, key: str | None) -> list[UsageRow]:
    start, end = day_start(since), day_start(until) + DAY
    where, args = ("AND key = ?", (key,)) if key else ("", ())
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, day, tasks, images, failed in conn.execute(
            "SELECT key, date(submitted_at, 'unixepoch'), COUNT(*), SUM(batch_size), "
            "SUM(status = 'failed') FROM tasks WHERE submitted_at >= ? AND submitted_at < ? %s "
            "GROUP BY 1, 2" % where, (start, end, *args)):
        rows[(name, day)] = {"tasks": tasks, "images": images or 0, "failed": failed or 0,
                             "refused": 0, "refused_by_reason": {}}
    for name, day, reason, count in conn.execute(
            "SELECT key, day, reason, count FROM refusals WHERE day >= ? AND day <= ? %s" % where,
            (since, until, *args)):
        row = rows.setdefault((name, day), {"tasks": 0, "images": 0, "failed": 0, "refused": 0,
                                            "refused_by_reason": {}})
        row["refused"] += count
        row["refused_by_reason"][reason] = count
    return [UsageRow(name, day, **fields) for (name, day), fields in sorted(rows.items())]
