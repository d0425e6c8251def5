"""Hostile clients against a real gateway process: connection churn, oversize bodies, clients that
stop reading. Normal clients keep their usual latency, and memory returns to its baseline."""

import asyncio
import json
import socket
import statistics
import time

import pytest

from helpers import eventually, port_of, rss_kib

PIPELINE = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 300


async def churn(port, count, batch=200):
    """`count` connections that send half a request, or half a body, and hang up."""
    partials = [b"GET /v1/images/abc HTTP/1.1\r\nHost: x\r\nX-Pad: aaaa",
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"model\": ",
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\nxxxx"]

    async def one(i):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(partials[i % len(partials)])
        await writer.drain()
        writer.close()

    for start in range(0, count, batch):
        await asyncio.gather(*(one(i) for i in range(start, min(count, start + batch))))


def non_readers(port, count):
    """Clients that pipeline many requests and never read an answer."""
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        try:
            s.send(PIPELINE)
        except BlockingIOError:
            pass
        sockets.append(s)
    return sockets


async def latencies(gateway, seconds, at_least=5):
    """/health latencies for `seconds`, and at least `at_least` of them: one slow answer (a
    connection queued behind the churn) must not be the whole median; a blocked loop slows all."""
    samples, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline or len(samples) < at_least:
        started = time.monotonic()
        response = await gateway.fetch("/health")
        assert response.code == 200
        samples.append(time.monotonic() - started)
        await asyncio.sleep(0.01)
    return samples


async def in_flight(gateway):
    return json.loads((await gateway.fetch("/health/ready")).body)["requests_in_flight"]


async def drained(gateway, timeout=10.0):
    async def none_in_flight():
        return await in_flight(gateway) == 0
    await eventually(none_in_flight, timeout, 0.05, "requests still in flight")


@pytest.mark.gen_test(timeout=90)
async def test_hostile_clients_do_not_hurt_normal_ones_or_leak(gateways):
    gateway = gateways("--write-timeout=0.3", "--idle-timeout=1", "--body-timeout=1", "--max-body-bytes=100000",
                       "--log-level=warning")
    await gateway.started()
    quiet = await latencies(gateway, 0.5)

    async def round_of_abuse():
        stuck = non_readers(gateway.port, 10)
        during = asyncio.ensure_future(latencies(gateway, 0.6))
        await churn(gateway.port, 400)
        oversize = [await gateway.fetch("/v1/chat/completions", method="POST", body="x" * 200000)
                    for _ in range(10)]
        assert all(r.code == 413 for r in oversize)
        samples = await during
        await asyncio.sleep(0.5)  # past write_timeout: the non-readers have been cut off
        await drained(gateway)
        for s in stuck:
            s.close()
        return samples

    # Warm-up: the allocator and the buffers reach their working size in a few rounds (measured:
    # RSS then stays flat however many rounds follow); a leak would keep growing.
    samples = [await round_of_abuse() for _ in range(4)]
    baseline = rss_kib(gateway.proc.pid)
    samples += [await round_of_abuse() for _ in range(4)]
    after = rss_kib(gateway.proc.pid)

    usual = statistics.median(quiet)
    for during in samples:
        # A blocked IOLoop shows as seconds; the floor leaves room for a busy 2-core machine
        # (0.05 s failed on untouched code there: a timing flake, not a regression).
        assert statistics.median(during) < max(10 * usual, 0.25), (usual, statistics.median(during))
        assert max(during) < 1.0
    assert after <= baseline * 1.10 + 2048, (baseline, after)  # KiB
    assert await gateway.stopped() == 0
    assert "Traceback" not in gateway.log()


@pytest.mark.gen_test(timeout=30)
async def test_hang_ups_mid_request_leave_no_coroutine_behind(make_proxy):
    """A handler whose client leaves mid-body must end: one pending coroutine per dropped
    connection would be a leak that grows for as long as the service runs."""
    proxy = make_proxy(idle_timeout=0.5, body_timeout=0.5, max_body_bytes=100000)
    port = port_of(proxy.url)
    await churn(port, 30)
    await asyncio.sleep(0.3)
    before = len(asyncio.all_tasks())
    await churn(port, 300)
    await eventually(lambda: len(asyncio.all_tasks()) <= before and not proxy.gateway.active, 5, 0.05,
                     lambda: "%d tasks left behind" % (len(asyncio.all_tasks()) - before))
