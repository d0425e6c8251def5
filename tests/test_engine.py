"""The shared long-poll engine: coalescing, cancellation, retries, cache, bounds."""

import asyncio
import json
import time

import pytest

from helpers import connect
from helpers import eventually as wait_until
from zimage_tornado.cache import ResultCache


async def open_wait(proxy, task_uuid):
    """A raw client that starts a long-poll; close() the stream to hang up mid-wait."""
    stream = await connect(proxy.url)
    await stream.write(b"GET /v1/images/%s HTTP/1.1\r\nHost: x\r\n\r\n" % task_uuid.encode())
    return stream


@pytest.mark.gen_test(timeout=10)
async def test_many_clients_on_one_task_share_one_read_per_interval(make_proxy, fake):
    fake.reads_to_complete = 6
    proxy = make_proxy(poll_interval=0.1)
    task_uuid = await proxy.submit()
    results = await asyncio.gather(*(proxy.json("/v1/images/%s" % task_uuid) for _ in range(50)))
    assert all(code == 200 and body["image_urls"] for code, body in results)
    assert fake.task_reads[task_uuid] == 6  # not 50 x 6
    gaps = [b - a for a, b in zip(fake.read_times[task_uuid], fake.read_times[task_uuid][1:])]
    assert min(gaps) >= 0.09
    assert proxy.gateway.watcher.counters["coalesced_waiters"] == 50  # all joined the loop following the task
    assert proxy.gateway.watcher.waiting == 0 and proxy.gateway.watcher.active_polls == 0


@pytest.mark.gen_test(timeout=10)
async def test_a_client_that_joins_late_keeps_its_own_deadline(make_proxy, fake):
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=0.05)
    task_uuid = await proxy.submit()
    started = time.monotonic()

    async def timed(delay):
        await asyncio.sleep(delay)
        code, _ = await proxy.json("/v1/images/%s?timeout=0.4" % task_uuid)
        return code, time.monotonic() - started

    (code_a, a), (code_b, b) = await asyncio.gather(timed(0), timed(0.3))
    assert code_a == code_b == 504
    assert 0.35 <= a < 0.6
    assert 0.65 <= b < 0.95
    assert fake.task_reads[task_uuid] <= 0.7 / 0.05 + 2


@pytest.mark.gen_test(timeout=10)
async def test_disconnected_clients_stop_the_polling(make_proxy, fake):
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=0.05, max_attempts=1000, follow_budget=0)  # no follow-up: waiters only
    watcher = proxy.gateway.watcher
    task_uuid = await proxy.submit()
    streams = [await open_wait(proxy, task_uuid) for _ in range(5)]
    await wait_until(lambda: watcher.waiting == 5)
    await asyncio.sleep(0.15)
    assert fake.task_reads[task_uuid] >= 2
    for stream in streams[:4]:
        stream.close()
    await wait_until(lambda: watcher.waiting == 1)
    assert watcher.active_polls == 1  # one client still waits
    streams[4].close()
    await wait_until(lambda: watcher.waiting == 0 and watcher.active_polls == 0)
    reads = fake.task_reads[task_uuid]
    await asyncio.sleep(0.3)
    assert fake.task_reads[task_uuid] <= reads + 1  # at most a read already in flight


@pytest.mark.gen_test(timeout=10)
async def test_transient_upstream_faults_do_not_end_a_wait(make_proxy, fake):
    fake.reads_to_complete = 2
    fake.retry_after = "0"
    fake.hang_seconds = 0.5
    proxy = make_proxy(poll_interval=0.05, upstream_timeout=0.2)
    task_uuid = await proxy.submit()
    fake.inject("task", "500", "502", "503", "429", "garbage", "reset", "hang", "no_uuid", "false200")
    code, body = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 200, body
    assert body["image_urls"]
    # 8 or 9: curl itself retries a request whose reused keep-alive connection was reset
    assert proxy.gateway.watcher.counters["upstream_errors"] >= 8


@pytest.mark.gen_test(timeout=10)
async def test_retry_after_is_honoured_when_longer_than_the_interval(make_proxy, fake):
    fake.retry_after = "0.5"
    proxy = make_proxy(poll_interval=0.05)
    task_uuid = await proxy.submit()
    fake.inject("task", "429")
    code, _ = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 200
    times = fake.read_times[task_uuid]
    assert times[1] - times[0] >= 0.45


@pytest.mark.gen_test(timeout=10)
async def test_budget_spent_while_upstream_fails_names_the_last_error(make_proxy, fake):
    proxy = make_proxy(poll_interval=0.05, max_attempts=4)
    task_uuid = await proxy.submit()
    fake.always("task", "503")
    code, body = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 502
    assert body["status"] == "timeout"
    assert "HTTP 503" in body["error"]["message"] and "HTTP 503" in body["upstream_error"]


@pytest.mark.gen_test(timeout=10)
async def test_budget_spent_while_upstream_times_out_is_504(make_proxy, fake):
    fake.hang_seconds = 1
    proxy = make_proxy(poll_interval=0.05, max_attempts=4, upstream_timeout=0.1)
    task_uuid = await proxy.submit()
    fake.always("task", "hang")
    code, body = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 504
    assert body["error"]["code"] == "upstream_unavailable"
    assert "did not answer in time" in body["upstream_error"]


@pytest.mark.gen_test
async def test_finished_tasks_are_answered_from_the_cache(proxy, fake):
    task_uuid = await proxy.submit()
    code, first = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 200
    reads = fake.task_reads[task_uuid]
    for _ in range(3):
        assert await proxy.json("/v1/images/%s" % task_uuid) == (200, first)
        code, task = await proxy.json("/v1/tasks/%s" % task_uuid)
        assert code == 200 and task["data"]["task"]["taskStatus"] == "completed"
    assert fake.task_reads[task_uuid] == reads
    assert proxy.gateway.watcher.counters["cache_hits"] == 6


@pytest.mark.gen_test
async def test_failed_tasks_are_cached_too(proxy, fake):
    fake.outcome = "fail"
    task_uuid = await proxy.submit()
    assert (await proxy.json("/v1/images/%s" % task_uuid))[0] == 502
    reads = fake.task_reads[task_uuid]
    assert (await proxy.json("/v1/images/%s" % task_uuid))[0] == 502
    assert fake.task_reads[task_uuid] == reads


@pytest.mark.gen_test(timeout=10)
async def test_waiters_past_the_cap_get_503_and_the_cap_frees_up(make_proxy, fake):
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=0.05, max_attempts=1000, max_waiters=2)
    task_uuid = await proxy.submit()
    streams = [await open_wait(proxy, task_uuid) for _ in range(2)]
    await wait_until(lambda: proxy.gateway.watcher.waiting == 2)
    response = await proxy.request("/v1/images/%s" % task_uuid)
    assert response.code == 503
    assert response.headers["Retry-After"] == "1"
    assert json.loads(response.body)["error"]["code"] == "too_many_waiters"
    for stream in streams:
        stream.close()
    await wait_until(lambda: proxy.gateway.watcher.waiting == 0)
    code, _ = await proxy.json("/v1/images/%s?timeout=0.1" % task_uuid)
    assert code == 504  # admitted again, and timed out normally


@pytest.mark.gen_test(timeout=10)
async def test_task_reads_coalesce_with_a_running_wait(make_proxy, fake):
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=1.0)
    task_uuid = await proxy.submit()
    waiting = asyncio.ensure_future(proxy.json("/v1/images/%s?timeout=0.5" % task_uuid))
    await wait_until(lambda: fake.task_reads[task_uuid] == 1)
    await asyncio.sleep(0.05)
    for _ in range(5):
        code, _ = await proxy.json("/v1/tasks/%s" % task_uuid)
        assert code == 200
    assert fake.task_reads[task_uuid] == 1  # reused the loop's read from this interval
    await waiting


def test_result_cache_is_bounded_and_expires():
    now = [0.0]
    cache = ResultCache(max_entries=2, ttl=10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and len(cache) == 2
    now[0] = 11
    assert cache.get("a") is None and cache.get("c") is None
