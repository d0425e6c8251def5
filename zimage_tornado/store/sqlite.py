"""The embedded store: one SQLite file (WAL), written by one thread of its own.

The IOLoop never touches the database: it queues an operation and, when it needs the answer
(an idempotency claim, an owner), awaits a future that the writer thread resolves. Writes whose
answer nobody waits for (usage rows, counts) collect in an outbox that reaches the thread every
OUTBOX_SECONDS as one item: the thread wakes a few times a second, not once per request, and does
not contend with the IOLoop for the GIL. The thread runs whatever is queued in one transaction,
each operation in a savepoint of its own. The schema is created and migrated here, at start.

Admission: a process that has the file to itself (`exclusive`, the default of one process)
decides on counters in memory, loaded from the database for each (scope, day) and written
through to it, so the database stays the truth across restarts; the rate window (one minute)
is not kept across a restart. Processes sharing the file (`--processes`) decide in a
`BEGIN IMMEDIATE` transaction instead, atomic across them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from typing import Any, Callable

from zimage_tornado.store import (DAY, MINUTE, Admission, Claim, Store, StoreUnavailable, TaskRecord, UsageRow,
                                  day_start, decide, utc_day)
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
)
MAX_QUEUED = 100_000  # items waiting for the writer: past this, the disk is not keeping up
OUTBOX_SECONDS = 0.05
MAX_SCOPES = 10_000  # rate windows kept in memory before the expired ones are swept
BATCH = 1000
TASK_COLUMNS = ("uuid", "key", "client", "model", "width", "height", "batch_size", "steps", "prompt",
                "negative_prompt", "submitted_at", "finished_at", "status", "image_count", "error", "image_urls")


class SqliteStore(Store):
    name = "sqlite"

    def __init__(self, path: str, *, record_ttl: float, clock: Callable[[], float] = time.time,
                 exclusive: bool = True) -> None:
        self.path = path
        self.record_ttl = record_ttl
        self.clock = clock
        self.exclusive = exclusive
        self._queue: queue.Queue[tuple[list[Operation], asyncio.Future[Any] | None] | None] = queue.Queue(MAX_QUEUED)
        self._outbox: list[Operation] = []
        self._outbox_timer: asyncio.TimerHandle | None = None
        self._hits: dict[str, deque[float]] = {}  # exclusive: each scope's requests within the last minute
        self._used: dict[tuple[str, str], int] = {}  # exclusive: images counted per (scope, day)
        self._swept_at = 0.0
        self._thread: threading.Thread | None = None
        self._migrated: concurrent.futures.Future[int] = concurrent.futures.Future()

    # -- the writer thread -------------------------------------------------------------------

    def open(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zimage-sqlite", daemon=True)
        self._thread.start()

    async def ready(self) -> None:
        version = await asyncio.wrap_future(self._migrated)
        log.info("store: SQLite %s (schema version %d)", self.path, version)

    async def close(self) -> None:
        self._flush()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    async def healthy(self) -> str | None:
        if self._migrated.done() and self._migrated.exception() is not None:
            return str(self._migrated.exception())
        return None if self._thread is not None and self._thread.is_alive() else "the SQLite writer has stopped"

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")  # other processes sharing the file
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across a crash of the process
            conn.execute("BEGIN IMMEDIATE")
            version = migrate(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._migrated.set_exception(StoreUnavailable("database %s: %s" % (self.path, e)))
            self._fail_all()
            return
        self._migrated.set_result(version)
        next_sweep = 0.0
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [(operation, item[1]) for operation in item[0]]
            while len(batch) < BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch += [(operation, item[1]) for operation in item[0]]
            if time.monotonic() >= next_sweep:
                batch.append((self._sweep, None))
                next_sweep = time.monotonic() + MINUTE
            self._execute(conn, batch)
        conn.close()

    def _execute(self, conn: sqlite3.Connection, batch: list[tuple[Operation, asyncio.Future[Any] | None]]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for operation, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    result, error = operation(conn), None
                    conn.execute("RELEASE op")
                except Exception as e:  # noqa: BLE001 - one operation's failure is its caller's alone
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    result, error = None, e
                    if future is None:
                        log.error("store: a write failed: %s", e)
                if future is not None:
                    results.append((future, result, error))
            conn.execute("COMMIT")
        except sqlite3.Error as e:  # the database itself failed (locked past busy_timeout, disk full)
            log.error("store: a batch of %d operations failed: %s", len(batch), e)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            failure = StoreUnavailable("The usage database is unavailable")
            results = [(future, None, failure) for _, future in batch if future is not None]
        if results:
            results[0][0].get_loop().call_soon_threadsafe(_settle, results)

    def _fail_all(self) -> None:
        """The database could not be opened: every queued and later caller is told so."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            future = item[1]
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

    async def _call(self, operation: Operation) -> Any:
        self._flush()  # what was sent before runs before this
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(([operation], future))
        except queue.Full:
            raise StoreUnavailable("The usage database is not keeping up") from None
        return await future

    def _send(self, operation: Operation) -> None:
        """A write nobody waits for: it leaves with the outbox."""
        self._outbox.append(operation)
        if self._outbox_timer is None:
            self._outbox_timer = asyncio.get_running_loop().call_later(OUTBOX_SECONDS, self._flush)

    def _flush(self) -> None:
        if self._outbox_timer is not None:
            self._outbox_timer.cancel()
            self._outbox_timer = None
        if not self._outbox:
            return
        operations, self._outbox = self._outbox, []
        try:
            self._queue.put_nowait((operations, None))
        except queue.Full:
            log.error("store: the database is not keeping up; %d writes dropped", len(operations))

    # -- the interface ------------------------------------------------------------------------

    async def admit(self, scope: str, plan: Plan, images: int, now: float) -> Admission:
        if not self.exclusive:
            return await self._call(lambda conn: admit(conn, scope, plan, images, now))
        day = utc_day(now)
        if plan.images_per_day and (scope, day) not in self._used:
            used = await self._call(lambda conn: images_used(conn, scope, day))
            if len(self._used) > 100_000 or any(d != day for _, d in self._used):
                self._used = {k: v for k, v in self._used.items() if k[1] == day}  # a new day: old ones go
            self._used.setdefault((scope, day), used)  # setdefault: another admit may have loaded it
        if len(self._hits) > MAX_SCOPES and now >= self._swept_at + 1:
            # Scopes that never came back (many client addresses) go; at most once a second, since
            # while that many are live a sweep finds little and would cost each admission its length.
            self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - MINUTE}
            self._swept_at = now
        hits = self._hits.setdefault(scope, deque())
        while hits and hits[0] <= now - MINUTE:
            hits.popleft()
        admission = decide(plan, images, now, day, len(hits), hits[0] if hits else None,
                           self._used.get((scope, day), 0))
        if admission.allowed:
            if plan.requests_per_minute:
                hits.append(now)
            if plan.images_per_day:
                self._used[(scope, day)] += images
                self._send(lambda conn: add_images(conn, scope, day, images))
        if not hits:
            del self._hits[scope]  # bounded by the scopes active within a minute
        return admission

    async def refund(self, scope: str, day: str, images: int) -> None:
        if (scope, day) in self._used:
            self._used[(scope, day)] = max(0, self._used[(scope, day)] - images)
        self._send(lambda conn: conn.execute(
            "UPDATE quota SET images = MAX(0, images - ?) WHERE scope = ? AND day = ?", (images, scope, day)))

    async def claim(self, scope: str, key: str, digest: str, ttl: float, now: float) -> Claim:
        def claim(conn: sqlite3.Connection) -> Claim:
            row = conn.execute("SELECT digest, uuid FROM idempotency WHERE scope = ? AND key = ? AND expires > ?",
                               (scope, key, now)).fetchone()
            if row is not None:
                return Claim(False, row[0], row[1])
            conn.execute("INSERT OR REPLACE INTO idempotency (scope, key, digest, uuid, expires) "
                         "VALUES (?, ?, ?, NULL, ?)", (scope, key, digest, now + ttl))
            return Claim(True, digest)
        return await self._call(claim)

    async def fulfil(self, scope: str, key: str, uuid: str, ttl: float, now: float) -> None:
        await self._call(lambda conn: conn.execute(
            "UPDATE idempotency SET uuid = ?, expires = ? WHERE scope = ? AND key = ?", (uuid, now + ttl, scope, key)))

    async def release(self, scope: str, key: str) -> None:
        self._send(lambda conn: conn.execute("DELETE FROM idempotency WHERE scope = ? AND key = ? AND uuid IS NULL",
                                             (scope, key)))

    async def record_task(self, record: TaskRecord) -> None:
        row = {**record.as_dict(), "image_urls": json.dumps(record.image_urls)}
        values = tuple(row[column] for column in TASK_COLUMNS)
        self._send(lambda conn: conn.execute(
            "INSERT OR IGNORE INTO tasks (%s) VALUES (%s)" % (", ".join(TASK_COLUMNS), ", ".join("?" * len(values))),
            values))

    async def finish_task(self, uuid: str, status: str, finished_at: float, image_count: int,
                          error: str | None, image_urls: list[str]) -> None:
        urls = json.dumps(image_urls)
        self._send(lambda conn: conn.execute(
            "UPDATE tasks SET status = ?, finished_at = ?, image_count = ?, error = ?, image_urls = ? "
            "WHERE uuid = ? AND finished_at IS NULL", (status, finished_at, image_count, error, urls, uuid)))

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

    async def recent_tasks(self, key: str | None, limit: int) -> list[TaskRecord]:
        def recent(conn: sqlite3.Connection) -> list[TaskRecord]:
            where, args = ("WHERE key = ?", (key,)) if key else ("", ())
            rows = conn.execute("SELECT %s FROM tasks %s ORDER BY submitted_at DESC LIMIT ?"
                                % (", ".join(TASK_COLUMNS), where), (*args, limit)).fetchall()
            return [record(dict(zip(TASK_COLUMNS, row))) for row in rows]
        return await self._call(recent)


def record(row: dict[str, Any]) -> TaskRecord:
    row["image_urls"] = json.loads(row["image_urls"]) if row.get("image_urls") else []
    return TaskRecord(**row)


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
    if admission.allowed and plan.requests_per_minute:
        conn.execute("INSERT INTO hits (scope, at) VALUES (?, ?)", (scope, now))
    if admission.allowed and plan.images_per_day:
        add_images(conn, scope, day, images)
    return admission


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
