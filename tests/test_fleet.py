"""One promise across processes and machines: gateway processes sharing a real redis-server
(started by the test on a free loopback port) behave like one gateway."""

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from helpers import eventually

CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}
INTERVAL = 0.3


def body_of(response):
    return json.loads(response.body)


def uuid_of(response):
    return body_of(response)["choices"][0]["message"]["content"]


async def fleet(gateways, redis_server, count, *args):
    members = [gateways("--redis_url=%s" % redis_server.url, "--poll_interval=%g" % INTERVAL, *args)
               for _ in range(count)]
    await asyncio.gather(*(member.started() for member in members))
    return members


async def keyed_fleet(gateways, redis_server, tmp_path, keys_toml, count=2):
    """`count` gateways on one Redis with the same keys file, and each key's Authorization header."""
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml)
    members = await fleet(gateways, redis_server, count, "--api_keys_file=%s" % keys)
    headers = {name: {"Authorization": "Bearer sk-%s" % name} for name in ("alice", "bob", "ops")}
    return members, headers


async def submit(gateway, headers=None, n=1, **extra):
    return await gateway.fetch("/v1/chat/completions", method="POST",
                               body=json.dumps({**CHAT, "batch_size": n, **extra}), headers=headers or {})


@pytest.mark.gen_test(timeout=60)
async def test_one_idempotency_key_sent_to_every_instance_makes_one_job(gateways, redis_server, fake):
    members = await fleet(gateways, redis_server, 3)
    answers = await asyncio.gather(*(submit(members[i % 3], {"Idempotency-Key": "order-7"}) for i in range(9)))
    assert [a.code for a in answers] == [200] * 9
    assert len({uuid_of(a) for a in answers}) == 1
    assert fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=60)
async def test_waiters_on_one_task_across_instances_share_one_upstream_read_per_interval(gateways, redis_server,
                                                                                          fake):
    fake.seconds_to_complete = 3.0
    members = await fleet(gateways, redis_server, 3)
    task_uuid = uuid_of(await submit(members[0]))
    waits = [members[i % 3].fetch("/v1/images/%s" % task_uuid) for i in range(90)]
    answers = await asyncio.gather(*waits)
    assert [a.code for a in answers] == [200] * 90
    times = fake.read_times[task_uuid]
    allowed = (times[-1] - times[0]) / INTERVAL + 1
    assert len(times) <= allowed + 1, (len(times), allowed)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= INTERVAL * 0.9  # never two reads of the task within an interval, fleet-wide


@pytest.mark.gen_test(timeout=60)
async def test_a_killed_lease_holder_is_replaced_within_two_intervals(gateways, redis_server, fake):
    fake.seconds_to_complete = 2.5
    members = await fleet(gateways, redis_server, 3)
    task_uuid = uuid_of(await submit(members[0]))
    waits = [asyncio.ensure_future(members[i % 3].fetch("/v1/images/%s" % task_uuid)) for i in range(30)]
    redis = redis_server.client()
    holder = await eventually(lambda: redis.get("zimage:lease:" + task_uuid), 5)
    victim = next(m for m in members if ":%d:" % m.proc.pid in holder)
    completes_at = fake.tasks[task_uuid]["completes_at"]
    await asyncio.sleep(max(0.0, completes_at - time.monotonic() - 0.2))
    victim.proc.send_signal(signal.SIGKILL)
    survivors = [w for i, w in enumerate(waits) if members[i % 3] is not victim]
    answers = await asyncio.gather(*survivors)
    answered = time.monotonic()
    assert [a.code for a in answers] == [200] * 20
    assert answered - completes_at <= 2 * INTERVAL + 0.5  # scheduling slack on a busy 2-core machine
    await asyncio.gather(*waits, return_exceptions=True)


@pytest.mark.gen_test(timeout=60)
async def test_a_daily_quota_is_one_quota_across_instances(gateways, redis_server, fake, tmp_path):
    (first, second), keys = await keyed_fleet(gateways, redis_server, tmp_path,
                                              '[keys.alice]\nkey = "sk-alice"\nimages_per_day = 4\n'
                                              '[keys.bob]\nkey = "sk-bob"\n')
    alice, bob = keys["alice"], keys["bob"]
    assert (await submit(first, alice, n=2)).code == 200
    assert (await submit(second, alice, n=2)).code == 200
    for member in (first, second):
        refused = await submit(member, alice, n=1)
        assert refused.code == 429 and body_of(refused)["error"]["code"] == "insufficient_quota"
    # ownership holds across instances too
    task_uuid = uuid_of(await submit(first, bob))
    assert (await second.fetch("/v1/images/%s" % task_uuid, headers=alice)).code == 404
    assert (await second.fetch("/v1/images/%s" % task_uuid, headers=bob)).code == 200
    assert fake.calls["generate"] == 3


@pytest.mark.gen_test(timeout=90)
async def test_redis_going_down_and_coming_back(gateways, redis_server, fake):
    fake.seconds_to_complete = 3.0
    (gateway,) = await fleet(gateways, redis_server, 1)
    task_uuid = uuid_of(await submit(gateway))
    running = asyncio.ensure_future(gateway.fetch("/v1/images/%s" % task_uuid))
    await asyncio.sleep(0.5)
    redis_server.stop()
    started = time.monotonic()
    refused = await submit(gateway)
    assert time.monotonic() - started < 3  # redis_timeout bounds it
    assert refused.code == 503 and body_of(refused)["error"]["code"] == "state_unavailable"
    assert refused.headers["Retry-After"]
    assert fake.calls["generate"] == 1  # nothing unmetered, nothing twice
    ready = await gateway.fetch("/health/ready")
    assert ready.code == 503 and "Redis" in body_of(ready)["store"]["error"]
    assert (await running).code == 200  # the running wait polled the upstream itself
    second = fake.add_task("made while Redis is down")
    assert (await gateway.fetch("/v1/images/%s" % second)).code == 200  # and so does a new one

    redis_server.start()  # the same port: the gateway reconnects by itself

    async def submits_again():
        return (await submit(gateway)).code == 200
    await eventually(submits_again, 10, 0.2)
    assert (await gateway.fetch("/health/ready")).code == 200
    assert "Traceback" not in gateway.log()


@pytest.mark.gen_test(timeout=60)
async def test_admin_usage_and_the_cli_answer_for_the_whole_fleet(gateways, redis_server, fake, tmp_path):
    (first, second), keys = await keyed_fleet(
        gateways, redis_server, tmp_path, '[keys.alice]\nkey = "sk-alice"\n[keys.ops]\nkey = "sk-ops"\nadmin = true\n')
    alice, ops = keys["alice"], keys["ops"]
    done = [uuid_of(await submit(member, alice, n=2)) for member in (first, second)]
    for task_uuid in done:
        assert (await first.fetch("/v1/images/%s" % task_uuid, headers=alice)).code == 200
    usage = body_of(await second.fetch("/admin/usage", headers=ops))["data"]
    assert [(row["key"], row["tasks"], row["images"]) for row in usage] == [("alice", 2, 4)]

    async def recorded():
        tasks = body_of(await first.fetch("/admin/tasks", headers=ops))["data"]
        return len(tasks) == 2 and all(t["status"] == "completed" for t in tasks) and tasks
    tasks = await eventually(recorded, 5, 0.1)
    assert {t["uuid"] for t in tasks} == set(done)
    cli = subprocess.run([sys.executable, "-m", "zimage_tornado", "usage", "--redis-url", redis_server.url, "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    assert [json.loads(line) for line in cli.stdout.splitlines()] == usage


def requests_total(metrics):
    """zimage_http_requests_total summed over its labels, from the Prometheus text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("zimage_http_requests_total{"))


@pytest.mark.gen_test(timeout=60)
async def test_metrics_of_several_worker_processes_are_the_whole_group(gateways, fake):
    gateway = gateways("--processes=2")
    await gateway.started()
    pids, asked = set(), 1  # the start-up probe was a request too

    async def both_workers_answered():
        nonlocal asked
        asked += 1
        pids.add(body_of(await gateway.fetch("/health", headers={"Connection": "close"}))["pid"])
        return len(pids) == 2
    await eventually(both_workers_answered, 20, 0.01)  # the kernel hands each connection to one of them
    totals = []
    for _round in range(12):
        for _ in range(5):
            await gateway.fetch("/health", headers={"Connection": "close"})
        asked += 5
        scrape = await gateway.fetch("/metrics", headers={"Connection": "close"})
        totals.append(requests_total(scrape.body.decode()))
        asked += 1
    assert totals == sorted(totals), totals  # never backwards, whichever worker answered
    # Every request so far is counted, by whichever worker served it. A worker counts a request
    # just after answering it, so a scrape may overtake the last count by a moment: let it land.
    await asyncio.sleep(0.3)
    settled = requests_total((await gateway.fetch("/metrics", headers={"Connection": "close"})).body.decode())
    assert settled == asked  # everything asked before this scrape (the scrape itself not yet)
    assert await gateway.stopped() == 0
