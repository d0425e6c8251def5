"""Submit throughput, and the latency the proxy adds over calling the upstream directly.

    python bench/submit.py                          # concurrency 1, 10, 100
    python bench/submit.py --concurrency 10 --requests 5000

Starts the fake upstream and the proxy as processes on 127.0.0.1. At each concurrency level,
that many clients (one keep-alive connection each) send the same generation request, first
straight to the fake (`POST /api/z-image/generate`), then through the proxy
(`POST /v1/chat/completions`), and the table compares the two. The proxy runs on a core of
its own; this script and the fake share the others. Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from common import Connection, cpu_split, fake_upstream, free_port, percentile, proxy, raise_fd_limit, started, table

UPSTREAM_BODY = {"prompt": "a red bicycle", "negative_prompt": "", "model": "turbo", "batch_size": 1,
                 "width": 1024, "height": 1024, "steps": 8, "cfg_scale": 7}
PROXY_BODY = {"model": "zimage-turbo", "messages": [{"role": "user", "content": "a red bicycle"}]}


async def run(port: int, path: str, body: dict, concurrency: int, requests: int) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    failures = 0
    remaining = [requests]

    async def client() -> None:
        nonlocal failures
        conn = await Connection.open(port)
        while remaining[0] > 0:
            remaining[0] -= 1
            sent = time.perf_counter()
            code, _ = await conn.request("POST", path, body)
            latencies.append(time.perf_counter() - sent)
            failures += code != 200
        conn.close()

    started_at = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started_at, failures


async def bench(levels: list[int], requests: int) -> list[list]:
    upstream_port, proxy_port = free_port(), free_port()
    proxy_cpus, other_cpus = cpu_split()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    rows = []
    with started(fake_upstream(upstream_port), upstream_port, other_cpus), \
            started(proxy(proxy_port, upstream_port, upstream_max_clients=200), proxy_port, proxy_cpus):
        await run(proxy_port, "/v1/chat/completions", PROXY_BODY, 4, 200)  # warm up both processes
        for c in levels:
            direct, _, direct_failures = await run(upstream_port, "/api/z-image/generate", UPSTREAM_BODY, c, requests)
            proxied, seconds, failures = await run(proxy_port, "/v1/chat/completions", PROXY_BODY, c, requests)
            rows.append([
                c, requests, failures + direct_failures, "%.0f" % (requests / seconds),
                "%.2f" % (1000 * percentile(direct, 50)), "%.2f" % (1000 * percentile(direct, 99)),
                "%.2f" % (1000 * percentile(proxied, 50)), "%.2f" % (1000 * percentile(proxied, 99)),
                "%.2f" % (1000 * (percentile(proxied, 50) - percentile(direct, 50))),
            ])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--requests", type=int, default=2000, help="requests per level and path")
    args = parser.parse_args()
    raise_fd_limit()
    rows = asyncio.run(bench(args.concurrency, args.requests))
    print(table(["concurrency", "requests", "errors", "proxy req/s", "direct p50 ms", "direct p99 ms",
                 "proxy p50 ms", "proxy p99 ms", "added p50 ms"], rows))


if __name__ == "__main__":
    main()
