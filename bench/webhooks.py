"""Webhooks at volume: 1,000 tasks ending within about a second, each calling back a local receiver.

    python bench/webhooks.py                       # 1,000 tasks with a webhook, 1,000 without
    python bench/webhooks.py --tasks 200 --concurrency 10

Starts the fake upstream and the gateway as processes on 127.0.0.1, and a receiver in this
process. Clients submit at the given concurrency, every other request with a webhook, so that the
submit latency with and without one is measured under the same load. The fake holds every task
running until all are submitted, then completes them all at once (POST /_fake/complete): the
gateway sees them end within one poll interval. Then it waits for every message and reports: how
many arrived (and whether any twice), the delay from the gateway seeing the task end (the
event's timestamp) to the receiver having it, the delay from the upstream's completion (which
includes the polling interval), and the submit latency of both halves. Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from datetime import datetime

from common import Connection, cpu_split, fake_upstream, free_port, percentile, proxy, raise_fd_limit, started, table

SECRET = "whsec_" + base64.b64encode(b"benchmark secret, 32 bytes long!").decode()
BODY = {"model": "zimage-turbo", "prompt": "a paper boat"}


class Receiver:
    """A minimal keep-alive HTTP/1.1 server: records each delivery, answers 200."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, float, str, dict]] = []  # (monotonic, wall, webhook-id, event)
        self.port = free_port()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", self.port, backlog=1024)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
                lowered = {k.lower(): v for k, v in headers.items()}
                body = await reader.readexactly(int(lowered.get("content-length", "0")))
                self.arrivals.append((time.monotonic(), time.time(), lowered.get("webhook-id", ""), json.loads(body)))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def submit_all(port: int, hook: str, tasks: int, concurrency: int) -> tuple[list[float], list[float], int]:
    """2 x `tasks` submits, alternating with and without a webhook: (latencies with, without, failures)."""
    with_hook: list[float] = []
    without: list[float] = []
    failures = 0
    counter = [0]

    async def client() -> None:
        nonlocal failures
        conn = await Connection.open(port)
        while counter[0] < 2 * tasks:
            number = counter[0]
            counter[0] += 1
            body = {**BODY, "webhook": hook} if number % 2 == 0 else BODY
            sent = time.perf_counter()
            code, _ = await conn.request("POST", "/v1/chat/completions", body)
            (with_hook if number % 2 == 0 else without).append(time.perf_counter() - sent)
            failures += code != 200
        conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return with_hook, without, failures


async def fake_call(port: int, method: str, path: str) -> dict:
    conn = await Connection.open(port)
    code, answer = await conn.request(method, path)
    conn.close()
    return answer


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks with a webhook (as many again without)")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args()
    raise_fd_limit()
    proxy_cpus, other_cpus = cpu_split()
    receiver = Receiver()
    await receiver.start()
    upstream_port, proxy_port = free_port(), free_port()
    with started(fake_upstream(upstream_port, seconds_to_complete=3600), upstream_port, other_cpus), \
            started(proxy(proxy_port, upstream_port, poll_interval=args.poll_interval, webhook_secret=SECRET,
                          webhook_hosts="127.0.0.1", upstream_reads_per_second=0), proxy_port, proxy_cpus):
        began = time.perf_counter()
        with_hook, without, failures = await submit_all(proxy_port, "http://127.0.0.1:%d/hook" % receiver.port,
                                                        args.tasks, args.concurrency)
        submitted_in = time.perf_counter() - began
        await fake_call(upstream_port, "POST", "/_fake/complete")
        deadline = time.monotonic() + 60
        while len(receiver.arrivals) < args.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a duplicate would arrive now
        stats = await fake_call(upstream_port, "GET", "/_fake/stats")
    completes_at = stats["completes_at"]
    seen_to_received = []
    upstream_to_received = []
    for monotonic, wall, _, event in receiver.arrivals:
        seen = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        seen_to_received.append(wall - seen)
        uuid = event["data"]["data"]["task"]["uuid"]
        upstream_to_received.append(monotonic - completes_at[uuid])
    ids = [webhook_id for _, _, webhook_id, _ in receiver.arrivals]
    print("%d tasks with a webhook and %d without, submitted at concurrency %d in %.2f s (%d failed), then all "
          "completed at once; poll_interval %.1f s" % (args.tasks, args.tasks, args.concurrency, submitted_in,
                                                      failures, args.poll_interval))
    ms = lambda values, q: "%.1f" % (1000 * percentile(values, q))  # noqa: E731
    print(table(["measure", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"], [
        ["delivered (distinct webhook-id)", "%d (%d)" % (len(ids), len(set(ids))), "", "", "", ""],
        ["gateway saw the end -> received", len(seen_to_received), ms(seen_to_received, 50),
         ms(seen_to_received, 90), ms(seen_to_received, 99), ms(seen_to_received, 100)],
        ["upstream completed -> received", len(upstream_to_received), ms(upstream_to_received, 50),
         ms(upstream_to_received, 90), ms(upstream_to_received, 99), ms(upstream_to_received, 100)],
        ["submit with a webhook", len(with_hook), ms(with_hook, 50), ms(with_hook, 90), ms(with_hook, 99),
         ms(with_hook, 100)],
        ["submit without", len(without), ms(without, 50), ms(without, 90), ms(without, 99), ms(without, 100)],
    ]))


if __name__ == "__main__":
    asyncio.run(main())
