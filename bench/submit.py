"""Submit throughput, and the latency the proxy adds over calling the upstream directly.

    python bench/submit.py                          # concurrency 1, 10, 100; without and with keys
    python bench/submit.py --concurrency 10 --requests 5000 --keys yes

Starts the fake upstream and the proxy as processes on 127.0.0.1. At each concurrency level,
that many clients (one keep-alive connection each) send the same generation request, first
straight to the fake (`POST /api/z-image/generate`), then through the proxy
(`POST /v1/chat/completions`), and the table compares the two. The proxy runs on a core of
its own; this script and the fake share the others. Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import os
import statistics
import time

from common import (
    SCRATCH,
    Connection,
    cpu_split,
    fake_upstream,
    free_port,
    percentile,
    proxy,
    raise_fd_limit,
    started,
    table,
)

UPSTREAM_BODY = {"prompt": "a red bicycle", "negative_prompt": "", "model": "turbo", "batch_size": 1,
                 "width": 1024, "height": 1024, "steps": 8, "cfg_scale": 7}
PROXY_BODY = {"model": "zimage-turbo", "messages": [{"role": "user", "content": "a red bicycle"}]}


async def run(port: int, path: str, body: dict, concurrency: int, requests: int,
              headers: dict[str, str] | None = None) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    failures = 0
    remaining = [requests]

    async def client() -> None:
        nonlocal failures
        conn = await Connection.open(port)
        while remaining[0] > 0:
            remaining[0] -= 1
            sent = time.perf_counter()
            code, _ = await conn.request("POST", path, body, headers=headers)
            latencies.append(time.perf_counter() - sent)
            failures += code != 200
        conn.close()

    started_at = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started_at, failures


# --keys: a named key whose limits are checked (and counted) on every submit, high enough never to refuse
KEYS_FILE = """[keys.bench]
key = "sk-bench"
requests_per_minute = 100000000
images_per_day = 100000000
"""


SETUPS = {"no": "no keys", "yes": "keys + limits", "floor": "floor (bare Tornado forwarder)"}


def cpu_seconds(pid: int) -> float:
    """The process's user and system CPU time so far (/proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(levels: list[int], requests: int, keys: str, extra: dict[str, str] | None = None,
                label: str = "") -> list[list]:
    """keys: "no", "yes" (a key with limits) or "floor" (bench/floor_proxy.py in the gateway's place)."""
    extra = extra or {}
    upstream_port, proxy_port = free_port(), free_port()
    proxy_cpus, other_cpus = cpu_split()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    settings: dict[str, object] = {"upstream_max_clients": 200}
    headers = None
    if keys == "yes":
        path = os.path.join(SCRATCH.name, "keys.toml")
        with open(path, "w") as f:
            f.write(KEYS_FILE)
        settings["api_keys_file"], headers = path, {"Authorization": "Bearer sk-bench"}
    rows = []
    settings.update(extra)
    floor = [os.path.join(os.path.dirname(__file__), "floor_proxy.py"), str(proxy_port), str(upstream_port)]
    with started(fake_upstream(upstream_port), upstream_port, other_cpus), \
            started(floor if keys == "floor" else proxy(proxy_port, upstream_port, **settings), proxy_port,
                    proxy_cpus) as gateway:
        await run(proxy_port, "/v1/chat/completions", PROXY_BODY, 4, 200, headers)  # warm up both processes
        for c in levels:
            direct, direct_seconds, direct_failures = await run(upstream_port, "/api/z-image/generate",
                                                                UPSTREAM_BODY, c, requests)
            cpu_before = cpu_seconds(gateway.pid)
            proxied, seconds, failures = await run(proxy_port, "/v1/chat/completions", PROXY_BODY, c, requests,
                                                   headers)
            cpu = cpu_seconds(gateway.pid) - cpu_before
            rows.append([
                (label + ": " if label else "") + SETUPS[keys], c, requests,
                failures + direct_failures,
                "%.0f" % (requests / direct_seconds), "%.0f" % (requests / seconds),
                "%.0f%%" % (100 * direct_seconds / seconds), "%.3f" % (1000 * cpu / requests),
                "%.2f" % (1000 * percentile(direct, 50)), "%.2f" % (1000 * percentile(direct, 99)),
                "%.2f" % (1000 * percentile(proxied, 50)), "%.2f" % (1000 * percentile(proxied, 99)),
                "%.2f" % (1000 * (percentile(proxied, 50) - percentile(direct, 50))),
            ])
    return rows


def medians(rows: list[list], label: str) -> list[list]:
    """One row per setup and level: the median of each column over the repeated runs."""
    groups: dict[tuple[str, int], list[list]] = {}
    for row in rows:
        groups.setdefault((row[0].rpartition(": ")[2], row[1]), []).append(row)
    summary = []
    for (setup, level), runs in groups.items():
        middle = [statistics.median(float(str(run[i]).rstrip("%")) for run in runs) for i in range(3, len(runs[0]))]
        summary.append(["%smedian of %d: %s" % (label + " " if label else "", len(runs), setup), level,
                        runs[0][2], "%d" % middle[0], "%.0f" % middle[1], "%.0f" % middle[2], "%.0f%%" % middle[3],
                        "%.3f" % middle[4], *("%.2f" % value for value in middle[5:])])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--requests", type=int, default=2000, help="requests per level and path")
    parser.add_argument("--keys", choices=["both", "all", "no", "yes", "floor"], default="both",
                        help="without keys, with a key whose limits are checked on every submit, both, or all: "
                             "both and the floor (bench/floor_proxy.py, a bare Tornado forwarder, in the "
                             "gateway's place)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a gateway setting for this run (e.g. event_loop=asyncio); repeatable")
    parser.add_argument("--label", default="", help="the setup column's text")
    parser.add_argument("--repeat", type=int, default=1,
                        help="with --keys both or all: run the setups this many times, alternating, and add the "
                             "medians (a shared machine drifts by more than the difference being measured)")
    parser.add_argument("--rows", action="store_true", help=argparse.SUPPRESS)  # JSON rows, for "both"
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.setting)
    raise_fd_limit()
    if args.keys in ("both", "all"):  # each setup in a fresh process: a second run in this one comes out slower
        rows = []
        for run_number in range(1, args.repeat + 1):
            label = args.label + (" #%d" % run_number if args.repeat > 1 else "")
            for keys in ("no", "yes", "floor")[:3 if args.keys == "all" else 2]:
                child = subprocess.run([sys.executable, __file__, "--keys", keys, "--rows",
                                        "--requests", str(args.requests), "--label", label.strip(),
                                        *("--setting=" + item for item in args.setting),
                                        "--concurrency", *map(str, args.concurrency)], capture_output=True,
                                       text=True, check=True)
                rows += json.loads(child.stdout)
        if args.repeat > 1:
            rows += medians(rows, args.label)
    else:
        rows = asyncio.run(bench(args.concurrency, args.requests, args.keys, extra, args.label))
    if args.rows:
        return print(json.dumps(rows))
    print(table(["setup", "concurrency", "requests", "errors", "direct req/s", "proxy req/s", "of direct",
                 "proxy CPU ms/submit", "direct p50 ms", "direct p99 ms",
                 "proxy p50 ms", "proxy p99 ms", "added p50 ms"], rows))


if __name__ == "__main__":
    main()
