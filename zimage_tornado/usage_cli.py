"""`zimage-tornado usage`: the per-key usage table, read from the SQLite database directly (no
server needed; the database may be in use by one)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence, TypeVar

from zimage_tornado import validation
from zimage_tornado.config import server_settings
from zimage_tornado.errors import ApiError
from zimage_tornado.logs import redact_url
from zimage_tornado.store import StoreUnavailable, UsageRow, utc_day
from zimage_tornado.store.sqlite import end_user_usage, usage

if TYPE_CHECKING:
    from zimage_tornado.store.redis import RedisStore

T = TypeVar("T")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="zimage-tornado usage",
                                     description="Tasks, images, failed and refused per key and UTC day.")
    parser.add_argument("--database", help="the gateway's database file (default: the server's database setting)")
    parser.add_argument("--config", help="the server's --config file, to find its database or Redis")
    parser.add_argument("--env-file", help="the server's environment file (systemd EnvironmentFile), likewise")
    parser.add_argument("--since", help="first day, YYYY-MM-DD (default: 30 days ago)")
    parser.add_argument("--until", help="last day, YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--key", help="one key's rows only")
    parser.add_argument("--redis-url", help="read the fleet's usage from this Redis instead of a database file")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--by", choices=("key", "end_user"), default="key",
                        help="rows per key (default) or per end user (OpenAI's user of each submit)")
    args = parser.parse_args(argv)
    try:
        since, until = validation.day_range(args.since, args.until, utc_day(time.time()))
        key = validation.key_name(args.key)
    except ApiError as e:
        parser.error(e.message)
    try:
        settings = server_settings(args.config, args.env_file)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    # The same state the server uses, found the same way: its settings, unless told otherwise here.
    redis_url = args.redis_url or (None if args.database else settings.redis_url)
    database = os.path.abspath(args.database or settings.database)
    where = redact_url(redis_url) if redis_url else database
    try:
        if not redis_url and not os.path.exists(database):
            raise sqlite3.OperationalError("no such file (give the server's --config, --env-file or --database)")
        if args.by == "end_user":
            return print_end_users(where, redis_url, database, since, until, key, args.json)
        rows = redis_usage(redis_url, since, until, key) if redis_url else file_usage(database, since, until, key)
    except (sqlite3.Error, StoreUnavailable) as e:
        print("zimage-tornado usage: %s: %s" % (where, e), file=sys.stderr)
        return 1
    print("usage from %s" % where, file=sys.stderr)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict(), sort_keys=True))
        return 0
    print(table(["key", "day", "tasks", "images", "failed", "refused"],
                [[r.key, r.day, r.tasks, r.images, r.failed, r.refused] for r in rows]))
    return 0


def print_end_users(where: str, redis_url: str | None, database: str, since: str, until: str, key: str | None,
                    as_json: bool) -> int:
    if redis_url:
        rows = from_redis(redis_url, lambda store: store.end_user_usage(since, until, key))
    else:
        conn = sqlite3.connect("file:%s?mode=ro" % database, uri=True)
        try:
            rows = end_user_usage(conn, since, until, key)
        finally:
            conn.close()
    print("usage from %s" % where, file=sys.stderr)
    if as_json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    print(table(["end user", "day", "tasks", "images", "failed"],
                [[r["end_user"] or "-", r["day"], r["tasks"], r["images"], r["failed"]] for r in rows]))
    return 0


def file_usage(database: str, since: str, until: str, key: str | None) -> list[UsageRow]:
    conn = sqlite3.connect("file:%s?mode=ro" % database, uri=True)
    conn.execute("PRAGMA busy_timeout = 5000")
    try:
        return usage(conn, since, until, key)
    finally:
        conn.close()


def redis_usage(url: str, since: str, until: str, key: str | None) -> list[UsageRow]:
    return from_redis(url, lambda store: store.usage(since, until, key))


def from_redis(url: str, read: Callable[[RedisStore], Awaitable[T]]) -> T:
    """`read` of a fleet's store, on a connection of its own for this command."""
    from zimage_tornado.store.redis import RedisStore  # redis-py is loaded only where a fleet needs it

    async def run() -> T:
        store = RedisStore(url, timeout=5.0, record_ttl=0)
        try:
            return await read(store)
        finally:
            await store.close()
    return asyncio.run(run())


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width)
                       in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])
