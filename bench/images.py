"""The conversion path: 100 concurrent images.generate answers in b64_json, PNG as the image host
has it against WebP converted by the gateway (Pillow in a worker thread), 1024x1024 pictures.

    python bench/images.py                  # 100 requests at once, png then webp

Starts the fake upstream and a gateway as processes on 127.0.0.1; while the requests run, a probe
asks GET /health every 5 ms: its slowest answer is how long the IOLoop could not answer anyone.
Stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from common import Connection, fake_upstream, free_port, proxy, raise_fd_limit, started, table


async def burst(port: int, count: int, fmt: str) -> list[object]:
    body = {"model": "zimage-turbo", "prompt": "a benchmark picture %s" % fmt, "size": "1024x1024",
            "response_format": "b64_json", "output_format": fmt}
    stop = asyncio.Event()
    probes: list[float] = []

    async def probe() -> None:
        conn = await Connection.open(port)
        while not stop.is_set():
            sent = time.perf_counter()
            await conn.request("GET", "/health")
            probes.append(time.perf_counter() - sent)
            await asyncio.sleep(0.005)
        conn.close()

    async def one(i: int) -> float:
        conn = await Connection.open(port)
        sent = time.perf_counter()
        code, _ = await conn.request("POST", "/v1/images/generations", {**body, "prompt": body["prompt"] + str(i)})
        conn.close()
        assert code == 200, code
        return time.perf_counter() - sent

    prober = asyncio.ensure_future(probe())
    latencies = await asyncio.gather(*(one(i) for i in range(count)))
    stop.set()
    await prober
    return [fmt, count, "%.0f" % (1000 * statistics.median(latencies)), "%.0f" % (1000 * max(latencies)),
            "%.1f" % (1000 * statistics.median(probes)), "%.1f" % (1000 * max(probes))]


async def run(count: int) -> list[list[object]]:
    upstream, gateway = free_port(), free_port()
    with started(fake_upstream(upstream, reads_to_complete=1), upstream), \
            started(proxy(gateway, upstream, poll_interval=0.2, image_fetches=16, upstream_reads_per_second=0),
                    gateway):
        return [await burst(gateway, count, fmt) for fmt in ("png", "webp")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    raise_fd_limit()
    rows = asyncio.run(run(args.requests))
    print(table(["output_format", "requests at once", "answer p50 ms", "answer max ms", "/health p50 ms",
                 "/health max ms (longest stall)"], rows))


if __name__ == "__main__":
    main()
