"""Reads: upstream status reads per task per interval under many readers, the picture endpoint's
memory per stalled client, and what admitting a new client address costs with many seen.

    python bench/reads.py                  # 1,000 readers over 100 tasks for 10 s; 60 stalled clients

Starts the fake upstream and a gateway as processes on 127.0.0.1 (the admission part runs the
store in this process). Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request

from common import SCRATCH, Connection, fake_upstream, free_port, proxy, raise_fd_limit, rss_kb, started, table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from zimage_tornado.store.sqlite import SqliteStore  # noqa: E402
from zimage_tornado.tenants import Plan  # noqa: E402
from zimage_tornado.web.access import network_of  # noqa: E402

CHAT = {"model": "zimage-turbo", "prompt": "a reading benchmark"}


def fake_reads(port: int) -> int:
    with urllib.request.urlopen("http://127.0.0.1:%d/_fake/stats" % port, timeout=10) as answer:
        return int(json.load(answer)["task_reads"])


async def readers(args: argparse.Namespace) -> list[list[object]]:
    upstream, gateway = free_port(), free_port()
    interval = args.interval
    with started(fake_upstream(upstream, reads_to_complete=10 ** 9), upstream), \
            started(proxy(gateway, upstream, poll_interval=interval, ip_reads_per_minute=0,
                          upstream_reads_per_second=0), gateway):
        submit = await Connection.open(gateway)
        uuids = []
        for _ in range(args.tasks):
            _, body = await submit.request("POST", "/v1/chat/completions", CHAT)
            uuids.append(body["choices"][0]["message"]["content"])
        submit.close()
        before, started_at = fake_reads(upstream), time.monotonic()
        answered = [0]

        async def reader(i: int) -> None:
            conn = await Connection.open(gateway)
            while time.monotonic() - started_at < args.seconds:
                code, _ = await conn.request("GET", "/v1/tasks/%s" % uuids[i % len(uuids)])
                answered[0] += code == 200
            conn.close()

        await asyncio.gather(*(reader(i) for i in range(args.readers)))
        elapsed = time.monotonic() - started_at
        reads = fake_reads(upstream) - before
    per_task_interval = reads / (len(uuids) * elapsed / interval)
    return [["status reads", args.readers, len(uuids), "%.0f" % (answered[0] / elapsed), reads,
             "%.2f" % per_task_interval]]


async def stalled(args: argparse.Namespace) -> list[list[object]]:
    upstream, gateway = free_port(), free_port()
    size = args.picture_mib * 1024 * 1024
    with started(fake_upstream(upstream, image_bytes=size), upstream), \
            started(proxy(gateway, upstream, poll_interval=0.2, ip_reads_per_minute=0,
                          max_image_bytes=size * 2), gateway) as proc:
        conn = await Connection.open(gateway)
        _, body = await conn.request("POST", "/v1/chat/completions", CHAT)
        uuid = body["choices"][0]["message"]["content"]
        await conn.request("GET", "/v1/images/%s" % uuid)
        conn.close()
        before = rss_kb(proc.pid)
        writers = []
        for _ in range(args.stalled):
            _, writer = await asyncio.open_connection("127.0.0.1", gateway)
            writer.write(b"GET /v1/images/%s/0 HTTP/1.1\r\nHost: x\r\n\r\n" % uuid.encode())
            writers.append(writer)
        await asyncio.sleep(3)
        grown = rss_kb(proc.pid) - before
        for writer in writers:
            writer.close()
    return [["stalled picture readers", args.stalled, "%d MiB" % args.picture_mib, "%.1f" % (grown / 1024),
             "%.0f" % (grown / args.stalled)]]


async def admissions(counts: list[int]) -> list[list[object]]:
    rows = []
    for seen in counts:
        store = SqliteStore(os.path.join(SCRATCH.name, "admit-%d.sqlite3" % seen), record_ttl=86400)
        store.open()
        await store.ready()
        now = time.time()
        for i in range(seen):  # addresses seen within the minute
            await store.admit_read("ip:" + network_of("2001:db8:%x::1" % i, (32, 64)), 600, now)
        costs = []
        for i in range(2000):  # new ones, each timed
            started_at = time.perf_counter()
            await store.admit_read("ip:" + network_of("2001:db9:%x::1" % i, (32, 64)), 600, now)
            costs.append(time.perf_counter() - started_at)
        submit_costs = []
        for i in range(500):  # a submit's admission of a new address: decided in memory, committed
            started_at = time.perf_counter()
            await store.admit("ip:192.0.%d.%d" % (i // 256, i % 256), Plan(requests_per_minute=10), 1, now)
            submit_costs.append(time.perf_counter() - started_at)
        await store.close()
        rows.append(["admission of a new address", seen, "%.4f" % (1000 * statistics.median(costs)),
                     "%.3f" % (1000 * statistics.median(submit_costs))])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--interval", type=float, default=1.0, help="the gateway's poll_interval")
    parser.add_argument("--stalled", type=int, default=60)
    parser.add_argument("--picture-mib", type=int, default=15)
    parser.add_argument("--addresses", type=int, nargs="+", default=[10, 100_000])
    args = parser.parse_args()
    raise_fd_limit()
    print(table(["reads", "readers", "tasks", "answers/s", "upstream reads", "reads per task per interval"],
                asyncio.run(readers(args))))
    print()
    print(table(["memory", "clients", "picture", "RSS growth MiB", "KiB per client"], asyncio.run(stalled(args))))
    print()
    print(table(["admission", "addresses seen", "read admission median ms", "submit admission median ms"],
                asyncio.run(admissions(args.addresses))))


if __name__ == "__main__":
    main()
