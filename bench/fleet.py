"""A fleet on one machine: 3 gateway instances sharing a real Redis, with the fake upstream.

    python bench/fleet.py                               # 10,000 waiters over 100 tasks, interval 1 s
    python bench/fleet.py --waiters 3000 --instances 2

Starts redis-server, the fake upstream and N gateways (each with --redis_url) as processes on
127.0.0.1, submits the tasks, opens the waiters spread evenly over the instances (a task's
waiters on every instance), and prints:
- answered ok / errors, completion -> answer p50/p99 (from the task's completion upstream);
- upstream reads per task per interval across the fleet (target <= 1.05) and the shortest gap
  between two reads of one task, as a fraction of the interval;
- Redis commands per waiter and per second per 1,000 waiters while they wait, and Redis memory
  per task (from INFO: what sizing a Redis for a fleet needs);
then submit latency at concurrency 1 and 10 through one gateway on Redis and on the embedded store
(the gateway's core is saturated at 10: there, what a submit costs in CPU is multiplied by the
queue in front of it).
Stops by itself; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from typing import Iterator

from common import (SCRATCH, Connection, fake_upstream, free_port, percentile, proxy, raise_fd_limit, started, table,
                    wait_listening)
from longpoll import _fake_stats, long_poll, ms
from submit import PROXY_BODY, run


@contextlib.contextmanager
def redis_server(port: int) -> Iterator[str]:
    directory = os.path.join(SCRATCH.name, "redis-%d" % port)
    os.makedirs(directory)
    proc = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--dir", directory, "--save", "", "--appendonly", "no",
                             "--maxclients", "20000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield "redis://127.0.0.1:%d/0" % port
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def redis_info(port: int) -> dict[str, int]:
    import redis
    info = redis.Redis(port=port).info()
    return {"commands": int(info["total_commands_processed"]), "memory": int(info["used_memory"])}


async def waiting_round(n: int, instances: int, per_task: int, interval: float) -> list:
    redis_port, upstream_port = free_port(), free_port()
    ports = [free_port() for _ in range(instances)]
    tasks_count = n // per_task
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server(redis_port))
        stack.enter_context(started(fake_upstream(upstream_port, seconds_to_complete=6 + n / 2000), upstream_port))
        for port in ports:
            stack.enter_context(started(proxy(port, upstream_port, redis_url=url, poll_interval=interval,
                                              max_attempts=1000, max_waiters=n, upstream_max_clients=200), port))
        conn = await Connection.open(ports[0])
        memory_before = redis_info(redis_port)["memory"]
        tasks = []
        for i in range(tasks_count):
            code, body = await conn.request("POST", "/v1/chat/completions", {"model": "zimage-turbo",
                                                                              "prompt": "fleet %d" % i})
            assert code == 200, body
            tasks.append(body["choices"][0]["message"]["content"])
        conn.close()
        await asyncio.sleep(0.2)  # the usage rows are written in the background
        memory_per_task = (redis_info(redis_port)["memory"] - memory_before) / tasks_count
        completes_at = (await _fake_stats(upstream_port))["completes_at"]
        slots, connected = asyncio.Semaphore(1000), [0]
        answers: list[tuple[str, float]] = []
        errors: dict[str, int] = {}

        async def waiter(i: int) -> None:
            task_uuid = tasks[i % tasks_count]
            try:
                code, body = await long_poll(ports[(i // tasks_count) % instances], task_uuid, slots, connected)
            except Exception as e:  # noqa: BLE001 - counted in the table
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                return
            if code == 200 and body["uuid"] == task_uuid:
                answers.append((task_uuid, time.monotonic()))
            else:
                errors["HTTP %d" % code] = errors.get("HTTP %d" % code, 0) + 1

        runners = [asyncio.ensure_future(waiter(i)) for i in range(n)]
        while connected[0] < n:
            await asyncio.sleep(0.05)
        await asyncio.sleep(interval)  # every loop has started
        before, started_at = redis_info(redis_port), time.monotonic()
        await asyncio.sleep(min(3.0, max(0.5, min(completes_at.values()) - time.monotonic() - 0.5)))
        steady = redis_info(redis_port)["commands"] - before["commands"]
        steady_seconds = time.monotonic() - started_at
        await asyncio.gather(*runners)
        stats = await _fake_stats(upstream_port)
        total = [answered - completes_at[task_uuid] for task_uuid, answered in answers]
        windows = [stats["read_windows"][t] for t in tasks]
        reads_per_interval = sum(w[2] for w in windows) / sum((w[1] - w[0]) / interval + 1 for w in windows)
        commands = redis_info(redis_port)["commands"] - before["commands"]
        return [n, instances, tasks_count, len(answers), json.dumps(errors) if errors else 0,
                ms(total, 50), ms(total, 99), "%.3f" % reads_per_interval,
                "%.2f" % ((stats["min_read_gap"] or 0) / interval), "%.2f" % (commands / n),
                "%.0f" % (steady / steady_seconds / (n / 1000)), "%.0f" % memory_per_task]


async def submit_latency(redis: bool, concurrency: int) -> list:
    upstream_port, port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        settings: dict[str, object] = {"upstream_max_clients": 200}
        if redis:
            settings["redis_url"] = stack.enter_context(redis_server(free_port()))
        stack.enter_context(started(fake_upstream(upstream_port), upstream_port))
        stack.enter_context(started(proxy(port, upstream_port, **settings), port))
        await run(port, "/v1/chat/completions", PROXY_BODY, 4, 200)  # warm up
        latencies, seconds, failures = await run(port, "/v1/chat/completions", PROXY_BODY, concurrency, 2000)
        return ["Redis" if redis else "embedded (SQLite)", concurrency, failures, "%.0f" % (2000 / seconds),
                "%.2f" % (1000 * percentile(latencies, 50)), "%.2f" % (1000 * percentile(latencies, 99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", type=int, default=10000)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    raise_fd_limit()
    row = asyncio.run(waiting_round(args.waiters, args.instances, args.per_task, args.interval))
    print("poll_interval %gs" % args.interval)
    print(table(["waiters", "instances", "tasks", "answered ok", "errors", "completion->answer p50 ms", "p99 ms",
                 "reads/task/interval (fleet)", "min read gap/interval", "Redis commands/waiter",
                 "Redis commands/s per 1,000 waiters", "Redis bytes/task"], [row]))
    rows = [asyncio.run(submit_latency(redis, concurrency)) for concurrency in (1, 10) for redis in (False, True)]
    print(table(["store", "concurrency", "errors", "req/s", "submit p50 ms", "p99 ms"], rows))


if __name__ == "__main__":
    main()
