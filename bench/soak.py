"""Soak: a bounded, mixed load with a few per cent of upstream faults, to show nothing is lost.

    python bench/soak.py                       # 60 s, 3 % faults, 24 clients
    python bench/soak.py --duration 10         # the shortened run CI makes

Starts the fake upstream (injecting random faults: 5xx, 429, garbage, resets, hangs) and the proxy
as processes on 127.0.0.1; clients submit, read task status, long-poll and stream (chat in wait
mode) until the time is up. Prints requests and outcomes by kind, p50/p99 latency, and the proxy's
RSS after warm-up, at the middle and at the end. Exits 1 on an unexplained error (a client-side
failure, a 500, a malformed answer, a 4xx to a valid request, a stream without its end), on a lost
submission (accepted by the proxy, unknown upstream), or, for runs of 60 s or more, on RSS growing
more than 10 % after warm-up. The proxy's finished-task cache is kept small (--cache-size) so that
it is full by then: a cache filling up by design is not a leak. Talks to 127.0.0.1 only and stops
by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter, defaultdict

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from common import Connection, fake_upstream, free_port, percentile, proxy, raise_fd_limit, rss_kb, started, table

# Answers a faulty upstream explains: passed on (429) or mapped (502/504), in an envelope.
UPSTREAM_STATUSES = {429, 502, 503, 504}
WEIGHTS = {"submit": 40, "status": 20, "long-poll": 25, "stream": 15}


class Soak:
    def __init__(self, port: int, seed: int) -> None:
        self.url = "http://127.0.0.1:%d" % port
        self.http = AsyncHTTPClient(force_instance=True, max_clients=200)
        self.random = random.Random(seed)
        self.accepted: list[str] = []
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.latency: defaultdict[str, list[float]] = defaultdict(list)
        self.unexplained: list[str] = []

    async def call(self, kind: str, path: str, body: dict | None = None) -> tuple[int, bytes] | None:
        started = time.monotonic()
        try:
            response = await self.http.fetch(self.url + path, method="POST" if body else "GET",
                                             body=json.dumps(body) if body else None, raise_error=False,
                                             request_timeout=60)
        except (HTTPClientError, OSError) as e:  # the proxy must always answer
            self.unexplained.append("%s %s: %s" % (kind, path, e))
            self.outcomes[kind, "client error"] += 1
            return None
        self.latency[kind].append(time.monotonic() - started)
        self.outcomes[kind, str(response.code)] += 1
        if response.code >= 400:
            try:
                envelope = json.loads(response.body)["error"]
                well_formed = {"message", "type", "param", "code"} <= set(envelope)
            except (ValueError, KeyError, TypeError):
                well_formed = False
            if not well_formed or response.code not in UPSTREAM_STATUSES:
                self.unexplained.append("%s %s -> %d %s" % (kind, path, response.code, response.body[:200]))
        return response.code, response.body

    async def one(self) -> None:
        kind = self.random.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        if kind == "submit" or not self.accepted:
            result = await self.call("submit", "/v1/chat/completions",
                                     {"model": "zimage-turbo", "prompt": "soak %d" % self.random.randrange(10**6)})
            if result and result[0] == 200:
                self.accepted.append(json.loads(result[1])["choices"][0]["message"]["content"])
        elif kind == "status":
            await self.call("status", "/v1/tasks/%s" % self.random.choice(self.accepted))
        elif kind == "long-poll":
            await self.call("long-poll", "/v1/images/%s?timeout=8" % self.random.choice(self.accepted))
        else:
            result = await self.call("stream", "/v1/chat/completions", {
                "model": "zimage-turbo", "prompt": "a soak stream", "stream": True, "wait": True})
            if result and result[0] == 200 and not result[1].rstrip().endswith(b"data: [DONE]"):
                self.unexplained.append("stream without its end: %r" % result[1][-200:])

    async def run(self, clients: int, until: float) -> None:
        async def client() -> None:
            while time.monotonic() < until:
                await self.one()
        await asyncio.gather(*(client() for _ in range(clients)))


async def soak(args: argparse.Namespace) -> int:
    upstream_port, proxy_port = free_port(), free_port()
    with started(fake_upstream(upstream_port, seconds_to_complete=1.0, fault_rate=args.fault_rate,
                               hang_seconds=4), upstream_port), \
            started(proxy(proxy_port, upstream_port, poll_interval=0.25, max_attempts=40, upstream_timeout=2,
                          cache_size=args.cache_size), proxy_port) as proxy_proc:
        load = Soak(proxy_port, args.seed)
        begin = time.monotonic()
        end = begin + args.duration
        runner = asyncio.ensure_future(load.run(args.clients, end))
        rss: dict[str, int] = {}
        marks = {"after warm-up": begin + args.duration * 0.2, "middle": begin + args.duration * 0.5}
        while not runner.done():
            for name, at in marks.items():
                if name not in rss and time.monotonic() >= at:
                    rss[name] = rss_kb(proxy_proc.pid)
            await asyncio.sleep(0.2)
        await runner
        rss["end"] = rss_kb(proxy_proc.pid)
        connection = await Connection.open(upstream_port)
        _, stats = await connection.request("GET", "/_fake/stats")
        connection.close()
        load.http.close()

    known = set(stats["task_uuids"])
    lost = [u for u in load.accepted if u not in known]
    rows = []
    for kind in WEIGHTS:
        answers = {status: n for (k, status), n in sorted(load.outcomes.items()) if k == kind}
        lat = load.latency[kind]
        rows.append([kind, sum(answers.values()), ", ".join("%s: %d" % item for item in answers.items()),
                     "%.1f" % (1000 * percentile(lat, 50)), "%.1f" % (1000 * percentile(lat, 99))])
    print("soak: %gs, %d clients, %.0f %% upstream faults (fake: %s)" % (
        args.duration, args.clients, 100 * args.fault_rate, stats["calls"]))
    print(table(["kind", "requests", "answers by status", "p50 ms", "p99 ms"], rows))
    growth = rss["end"] / rss["after warm-up"] - 1
    print(table(["RSS after warm-up MiB", "middle MiB", "end MiB", "growth"],
                [["%.1f" % (rss["after warm-up"] / 1024), "%.1f" % (rss["middle"] / 1024),
                  "%.1f" % (rss["end"] / 1024), "%+.1f %%" % (100 * growth)]]))
    print("accepted submissions: %d, lost: %d; unexplained errors: %d" % (len(load.accepted), len(lost),
                                                                       len(load.unexplained)))
    for line in load.unexplained[:10]:
        print("  unexplained:", line)
    rss_failed = args.duration >= 60 and growth > 0.10
    if rss_failed:
        print("RSS grew more than 10 % after warm-up")
    return 1 if (lost or load.unexplained or rss_failed) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (at most 600)")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--fault-rate", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache-size", type=int, default=500,
                        help="the proxy's finished-task cache: small, so that it is full after warm-up and "
                             "any growth left is a leak, not the cache filling up")
    args = parser.parse_args()
    args.duration = min(args.duration, 600.0)  # bounded, always
    raise_fd_limit()
    sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
