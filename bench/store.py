"""The embedded store under write load: usage rows per second, and what it costs the IOLoop.

    python bench/store.py                     # 10 s at 5,000 and 20,000 rows/s offered
    python bench/store.py --rates 50000 --seconds 5

An IOLoop records usage rows through the real SqliteStore (a file in a temporary directory, WAL)
at a steady offered rate, as concurrent submits do, each waiting for its own row to be committed
(group commit: the writer commits everything queued at once and wakes the waiters), while a 1 ms
ticker measures how late the loop runs (its longest stall: the time the loop could not answer
anyone). The table shows the rows per second the database actually committed (sustained: the
writer kept up when it equals the offered rate), how long a request waited for its commit, and
the loop's lateness. A second row kind
measures admissions (a key with limits) in memory with their write-through. Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import time

from common import SCRATCH, percentile, table

from zimage_tornado.store import TaskRecord
from zimage_tornado.store.sqlite import SqliteStore
from zimage_tornado.tenants import Plan


async def ticker(stalls: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.001)
        stalls.append(loop.time() - before - 0.001)


async def one(rate: int, seconds: float, kind: str) -> list:
    path = os.path.join(SCRATCH.name, "bench-%s-%d.sqlite3" % (kind, rate))
    store = SqliteStore(path, record_ttl=86400)
    store.open()
    await store.ready()
    stalls: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.ensure_future(ticker(stalls, stop))
    loop = asyncio.get_running_loop()
    plan = Plan(requests_per_minute=10 ** 9, images_per_day=10 ** 9)
    started, sent = loop.time(), 0
    waits: list[float] = []

    async def write(i: int) -> None:  # one request: it waits for its own write to be committed
        begun = loop.time()
        if kind == "rows":
            await store.record_task(TaskRecord(
                uuid="bench-%d" % i, key="key-%d" % (i % 20), client="127.0.0.1", model="zimage-turbo",
                width=1024, height=1024, batch_size=1, steps=8, prompt="a benchmark prompt %d" % i,
                negative_prompt="", submitted_at=time.time()))
        else:
            await store.admit("key:key-%d" % (i % 20), plan, 1, time.time())
        waits.append(loop.time() - begun)

    requests: set[asyncio.Future[None]] = set()
    while loop.time() - started < seconds:
        due = int((loop.time() - started) * rate)  # a steady rate, in 10 ms steps
        for i in range(sent, due):
            request = asyncio.ensure_future(write(i))
            requests.add(request)
            request.add_done_callback(requests.discard)
        sent = due
        await asyncio.sleep(0.01)
    await asyncio.gather(*requests)
    elapsed = loop.time() - started
    await store.close()  # flushes what is queued, then the writer stops
    drained = loop.time() - started - elapsed
    stop.set()
    await tick
    conn = sqlite3.connect(path)
    table_name = "tasks" if kind == "rows" else "quota"
    counted = conn.execute("SELECT %s FROM %s" % ("COUNT(*)" if kind == "rows" else "COALESCE(SUM(images), 0)",
                                                  table_name)).fetchone()[0]
    conn.close()
    return [kind, rate, sent, counted, "%.0f" % (counted / (elapsed + drained)),
            "%.2f" % (1000 * percentile(waits, 50)), "%.2f" % (1000 * percentile(waits, 99)),
            "%.2f" % (1000 * percentile(stalls, 99)), "%.2f" % (1000 * max(stalls))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    rows = [asyncio.run(one(rate, args.seconds, kind)) for kind in ("rows", "admissions") for rate in args.rates]
    print(table(["writes", "offered per s", "sent", "in the database", "committed per s", "commit wait p50 ms",
                 "commit wait p99 ms", "loop lateness p99 ms", "longest loop stall ms"], rows))


if __name__ == "__main__":
    main()
