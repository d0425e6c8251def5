"""Long-poll at scale: N clients wait on tasks through one proxy process.

    python bench/longpoll.py                      # N = 1,000 and 10,000, poll_interval 1 s
    python bench/longpoll.py --waiters 2000 --interval 5

Starts the fake upstream and the proxy as processes on 127.0.0.1, submits N / per-task tasks
that the fake completes `complete-after` seconds later, opens N raw HTTP long-polls spread over
them (all connected before the tasks complete), and prints one row per N and spread (0: every
task completes at the same instant, the worst fan-out; 3 s: at random moments, as in real use):
- answers that were correct (200, the task's uuid, its image URL) and errors by kind;
- completion -> answer: from the moment the task completed upstream to the client's answer.
  It includes the wait for the proxy's next status check, which is up to one poll interval;
- check -> answer: from the upstream read that saw the task completed to the client's answer
  (the engine's own delivery time, fan-out to every waiter of the task included);
- the proxy's peak RSS and (peak - idle baseline) / N;
- upstream reads per task per interval, and the shortest gap between two reads of one task
  as a fraction of the interval (1.00 = never more than one read per interval);
- a fresh request during the burst: while the N clients connect (all at once), a probe opens a
  new connection for `GET /health` every 20 ms; its p99 and max latency (target p99 <= 0.5 s;
  a listen backlog below the burst shows up here as SYN retries of 1 s and more).
All three processes share the machine's cores: reading 10,000 answers at once is work for this
script as much as for the proxy. Stops by itself; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

from common import Connection, fake_upstream, free_port, percentile, proxy, raise_fd_limit, rss_kb, started, table


async def long_poll(port: int, task_uuid: str, slots: asyncio.Semaphore, connected: list[int]) -> tuple[int, dict]:
    async with slots:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connected[0] += 1
    writer.write(b"GET /v1/images/%s HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n" % task_uuid.encode())
    raw = await reader.read()  # the proxy closes after its answer
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def ms(values: list[float], q: float | None = None) -> str:
    value = max(values, default=float("nan")) if q is None else percentile(values, q)
    return "%.0f" % (1000 * value)


async def one_round(n: int, per_task: int, interval: float, complete_after: float, spread: float) -> list:
    upstream_port, proxy_port = free_port(), free_port()
    with started(fake_upstream(upstream_port, seconds_to_complete=complete_after, completion_spread=spread),
                 upstream_port), \
            started(proxy(proxy_port, upstream_port, poll_interval=interval, max_attempts=1000,
                          max_waiters=n * 2, upstream_max_clients=200), proxy_port) as proxy_proc:
        conn = await Connection.open(proxy_port)
        # warm up once, so that the baseline includes every loaded module and buffer
        code, body = await conn.request("POST", "/v1/chat/completions", {"model": "zimage-turbo", "prompt": "warm"})
        await conn.request("GET", "/v1/tasks/%s" % body["choices"][0]["message"]["content"])
        baseline = rss_kb(proxy_proc.pid)

        tasks = []
        for i in range((n + per_task - 1) // per_task):
            code, body = await conn.request("POST", "/v1/chat/completions",
                                            {"model": "zimage-turbo", "prompt": "bench %d" % i})
            assert code == 200, body
            tasks.append(body["choices"][0]["message"]["content"])
        conn.close()
        completes_at = (await _fake_stats(upstream_port))["completes_at"]  # the fake's monotonic clock

        slots, connected = asyncio.Semaphore(n), [0]  # every client connects at once: a burst
        answers: list[tuple[str, float]] = []  # (uuid, answered at)
        errors: dict[str, int] = {}

        async def waiter(i: int) -> None:
            task_uuid = tasks[i % len(tasks)]
            try:
                code, body = await long_poll(proxy_port, task_uuid, slots, connected)
            except Exception as e:  # noqa: BLE001 - any failure is counted in the table, not raised
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                return
            if code == 200 and body["uuid"] == task_uuid and len(body["image_urls"]) == 1:
                answers.append((task_uuid, time.monotonic()))
            else:
                errors["HTTP %d" % code] = errors.get("HTTP %d" % code, 0) + 1

        fresh: list[float] = []
        burst_over = threading.Event()
        probe = threading.Thread(target=_probe, args=(proxy_port, burst_over, fresh), daemon=True)
        probe.start()
        runners = [asyncio.ensure_future(waiter(i)) for i in range(n)]
        peak, all_connected_before_completion = baseline, None
        while not all(r.done() for r in runners):
            peak = max(peak, rss_kb(proxy_proc.pid))
            if all_connected_before_completion is None and connected[0] == n:
                all_connected_before_completion = time.monotonic() < min(completes_at.values())
                burst_over.set()
            await asyncio.sleep(0.05)
        if not all_connected_before_completion:
            print("warning: some waiters connected after their task completed; raise --complete-after")

        burst_over.set()
        await asyncio.get_running_loop().run_in_executor(None, probe.join)
        stats = await _fake_stats(upstream_port)
        seen = stats["finished_seen_at"]
        total = [answered - completes_at[task_uuid] for task_uuid, answered in answers]
        delivery = [answered - seen[task_uuid] for task_uuid, answered in answers]
        # A task read at once and then every interval needs (last - first) / interval + 1 reads.
        windows = [stats["read_windows"][t] for t in tasks]
        reads_per_interval = sum(w[2] for w in windows) / sum((w[1] - w[0]) / interval + 1 for w in windows)
        return [
            n, "%gs" % spread, len(tasks), len(answers), json.dumps(errors) if errors else 0,
            ms(total, 50), ms(total, 99), ms(total), ms(delivery, 50), ms(delivery, 99), ms(delivery),
            "%.1f" % (peak / 1024), "%.1f" % ((peak - baseline) / n),
            "%.2f" % reads_per_interval,
            "%.2f" % ((stats["min_read_gap"] or 0) / interval),
            ms(fresh, 99), ms(fresh),
        ]


def _probe(port: int, stop: threading.Event, latencies: list[float]) -> None:
    """Fresh `GET /health` requests, one every 20 ms until `stop`, from a thread of its own with
    blocking sockets, so that this script's busy event loop is not what gets measured."""
    while not stop.is_set() or len(latencies) < 10:
        sent = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            while sock.recv(65536):
                pass
        latencies.append(time.monotonic() - sent)
        time.sleep(0.02)


async def _fake_stats(port: int) -> dict:
    c = await Connection.open(port)
    _, body = await c.request("GET", "/_fake/stats")
    c.close()
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiters", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--per-task", type=int, default=100, help="waiters sharing one task")
    parser.add_argument("--interval", type=float, default=1.0, help="the proxy's poll_interval")
    parser.add_argument("--complete-after", type=float, default=None,
                        help="seconds until the fake completes a task (default: 4 + 1 per 1,000 waiters)")
    parser.add_argument("--spread", type=float, nargs="+", default=[0, 3],
                        help="tasks complete at random moments over this many seconds (0: all at once)")
    args = parser.parse_args()
    raise_fd_limit()
    rows = [asyncio.run(one_round(n, args.per_task, args.interval, args.complete_after or 4 + n / 1000, spread))
            for n in args.waiters for spread in args.spread]
    print("poll_interval %gs, %d waiters per task" % (args.interval, args.per_task))
    print(table(["waiters", "completions spread over", "tasks", "answered ok", "errors",
                 "completion->answer p50 ms", "p99 ms", "max ms", "check->answer p50 ms", "p99 ms", "max ms",
                 "peak RSS MiB", "KiB/waiter", "reads/task/interval", "min read gap/interval",
                 "fresh request during burst p99 ms", "max ms"], rows))


if __name__ == "__main__":
    main()
