"""A 200 is a promise kept: what an answer depends on is committed before it is sent, a fault never
turns one call into two paid jobs, a store that cannot write fails closed and recovers, and the
record follows every task to its end. Tried as a hostile operator would: SIGKILL, a full disk, a
paused Redis, a slow upstream. Real gateway processes, a real SQLite file, a real redis-server."""

import asyncio
import functools
import json
import os
import signal

import openai
import pytest

from helpers import eventually, fill

CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}
ALICE = {"Authorization": "Bearer sk-alice"}
BOB = {"Authorization": "Bearer sk-bob"}  # no limits
OPS = {"Authorization": "Bearer sk-ops"}
KEYS = """
[keys.alice]
key = "sk-alice"
images_per_day = 50
[keys.bob]
key = "sk-bob"
[keys.ops]
key = "sk-ops"
admin = true
"""


def keys_file(tmp_path, text=KEYS, name="keys.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def body_of(response):
    return json.loads(response.body)


async def submit(gateway, headers=ALICE, **extra):
    return await gateway.fetch("/v1/chat/completions", method="POST", body=json.dumps({**CHAT, **extra}),
                               headers=headers)


def uuid_of(response):
    return body_of(response)["choices"][0]["message"]["content"]


async def admin_task(gateway, uuid):
    tasks = body_of(await gateway.fetch("/admin/tasks?limit=1000", headers=OPS))["data"]
    return next((task for task in tasks if task["uuid"] == uuid), None)


async def has_status(gateway, uuid, status):
    task = await admin_task(gateway, uuid)
    return task is not None and task["status"] == status


# -- committed before answered ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["single", "processes", "redis"])
@pytest.mark.gen_test(timeout=90)
async def test_sigkill_right_after_a_200_loses_no_owner_quota_or_row(gateways, fake, tmp_path, mode, request):
    fake.outcome = "never"
    args = ["--api_keys_file=%s" % keys_file(tmp_path)]
    if mode == "processes":
        args.append("--processes=2")
    if mode == "redis":
        args.append("--redis_url=%s" % request.getfixturevalue("redis_server").url)
    gateway = gateways(*args)
    await gateway.started()
    answered = []
    for delay in (0, 0.005, 0.02, 0.04):
        response = await submit(gateway)
        assert response.code == 200, response.body
        answered.append(uuid_of(response))
        await asyncio.sleep(delay)
        gateway.kill()  # SIGKILL, workers included: no graceful anything
        gateway = gateways(*args)
        await gateway.started()
        for uuid in answered:  # the owner reads every task it was answered, at once
            assert (await gateway.fetch("/v1/tasks/%s" % uuid, headers=ALICE)).code == 200, (delay, uuid)
            assert await admin_task(gateway, uuid) is not None, (delay, uuid)
    after = await submit(gateway)
    assert after.headers["x-ratelimit-remaining-images"] == str(50 - 5)  # every use still counted


@pytest.mark.gen_test(timeout=60)
async def test_a_just_submitted_task_is_readable_at_once_on_any_worker(gateways, fake, tmp_path):
    fake.outcome = "never"
    gateway = gateways("--api_keys_file=%s" % keys_file(tmp_path), "--processes=2")
    await gateway.started()
    not_found = 0
    for _ in range(200):  # each request on a new connection: either worker may take it
        uuid = uuid_of(await submit(gateway, BOB))
        not_found += (await gateway.fetch("/v1/tasks/%s" % uuid, headers=BOB)).code == 404
    assert not_found == 0


# -- fail closed, say so, recover ---------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_full_disk_refuses_submits_before_the_upstream_then_recovers(gateways, fake, tmp_path, small_disk):
    gateway = gateways("--api_keys_file=%s" % keys_file(tmp_path), "--database=%s" % (small_disk / "db.sqlite3"),
                       "--pictures_dir=%s" % (tmp_path / "pictures"))  # the database's disk alone fills up
    await gateway.started()
    first = await submit(gateway)
    assert first.code == 200
    filler = fill(small_disk)
    jobs = fake.calls["generate"]
    for _ in range(5):
        refused = await submit(gateway)
        assert refused.code == 503, refused.body
        assert body_of(refused)["error"]["code"] == "state_unavailable" and refused.headers["Retry-After"]
    assert fake.calls["generate"] == jobs  # nothing reached the upstream unrecorded
    ready = await gateway.fetch("/health/ready")
    assert ready.code == 503
    assert body_of(ready)["store"]["ok"] is False and "full" in body_of(ready)["store"]["error"]
    filler.unlink()

    async def accepted():
        response = await submit(gateway)
        return response if response.code == 200 else None
    second = await eventually(accepted, timeout=10, interval=0.3)  # no restart
    assert (await gateway.fetch("/health/ready")).code == 200
    assert second.headers["x-ratelimit-remaining-images"] == str(50 - 2)  # the refused ones counted nothing
    for response in (first, second):
        assert await admin_task(gateway, uuid_of(response)) is not None


@pytest.mark.gen_test(timeout=60)
async def test_redis_paused_after_the_upstream_accepted_never_gives_a_200_without_an_owner(
        gateways, fake, tmp_path, redis_server):
    args = ["--api_keys_file=%s" % keys_file(tmp_path), "--redis_url=%s" % redis_server.url, "--redis_timeout=0.5"]
    first, second = gateways(*args), gateways(*args)
    await first.started()
    await second.started()
    fake.inject("generate", "hang")
    fake.hang_seconds = 0.5
    answer = asyncio.ensure_future(submit(first))
    await asyncio.sleep(0.25)  # admitted (Redis), now at the upstream
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        response = await answer
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert response.code == 503, response.body  # not a 200: its owner row is not written
    error = body_of(response)
    assert error["error"]["code"] == "state_unavailable" and response.headers["x-should-retry"] == "false"
    uuid = error["uuid"]
    assert uuid in fake.tasks and uuid in error["error"]["message"]  # told which task exists: do not resubmit

    async def readable():
        return (await second.fetch("/v1/tasks/%s" % uuid, headers=ALICE)).code == 200
    await eventually(readable, timeout=10, interval=0.2)  # the kept write landed: the owner reads it anywhere
    assert fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_redis_that_would_forget_is_named_at_start(gateways, redis_server):
    gateway = gateways("--redis_url=%s" % redis_server.url)  # the test's Redis: no AOF, no snapshots
    await gateway.started()
    log = gateway.log()
    assert "appendonly" in log and "forgets quota use" in log


# -- never a second paid job ---------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_a_slow_upstream_makes_one_job_for_one_sdk_call_and_its_key(make_proxy, fake, io_loop):
    proxy = make_proxy(upstream_timeout=0.3, max_attempts=200)  # SDK retries are recognised within a wait budget
    fake.always("generate", "hang")  # every submit arrives, and is answered too late
    fake.hang_seconds = 0.6
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="zimage-free", max_retries=2)

    def create(**kw):
        return client.chat.completions.create(model="zimage-turbo", messages=[{"role": "user", "content": "a fox"}],
                                              **kw)

    for kw in ({}, {"extra_headers": {"Idempotency-Key": "order-7"}}):
        with pytest.raises(openai.APIStatusError) as raised:
            await io_loop.run_in_executor(None, functools.partial(create, **kw))
        assert raised.value.status_code == 504 and raised.value.code == "upstream_outcome_unknown"
    await asyncio.sleep(0.8)
    assert fake.calls["generate"] == 2  # one per create(), the SDK's retries made none
    body = {"model": "zimage-turbo", "messages": [{"role": "user", "content": "a fox"}]}
    for _ in range(3):
        again = await proxy.request("/v1/chat/completions", "POST", body, headers={"Idempotency-Key": "order-7"})
        assert again.code == 504 and json.loads(again.body)["error"]["code"] == "upstream_outcome_unknown"
    retried = await proxy.request("/v1/chat/completions", "POST", body, headers={"x-stainless-retry-count": "1"})
    assert retried.code == 504  # an SDK retry of the keyless call gets the same answer
    await asyncio.sleep(0.8)
    assert fake.calls["generate"] == 2
    fresh = await proxy.request("/v1/chat/completions", "POST", body)  # a person pressing the button again
    assert fresh.code == 504 and fake.calls["generate"] == 3


# -- the record converges ---------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_task_nobody_waits_on_reaches_its_end_in_the_record_even_across_a_restart(gateways, fake, tmp_path):
    args = ["--api_keys_file=%s" % keys_file(tmp_path)]
    gateway = gateways(*args)
    await gateway.started()
    alone = uuid_of(await submit(gateway))  # nobody ever asks about it
    await eventually(lambda: has_status(gateway, alone, "completed"), timeout=5, interval=0.1)

    fake.outcome = "never"
    interrupted = uuid_of(await submit(gateway))
    assert await has_status(gateway, interrupted, "submitted")
    gateway.kill()
    fake.tasks[interrupted]["outcome"] = "complete"  # it ends while no gateway runs
    gateway = gateways(*args)
    await gateway.started()
    await eventually(lambda: has_status(gateway, interrupted, "completed"), timeout=5, interval=0.1)


@pytest.mark.gen_test(timeout=30)
async def test_a_task_that_never_ends_is_recorded_as_expired(gateways, fake, tmp_path):
    gateway = gateways("--api_keys_file=%s" % keys_file(tmp_path), "--follow_budget=1")
    await gateway.started()
    fake.outcome = "never"
    uuid = uuid_of(await submit(gateway))
    await eventually(lambda: has_status(gateway, uuid, "expired"), timeout=5, interval=0.1)
    reads = fake.task_reads[uuid]
    await asyncio.sleep(0.5)
    assert fake.task_reads[uuid] == reads  # no longer followed


# -- identity and ownership of state ------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_deleting_a_plain_key_does_not_hand_its_tasks_to_the_next(gateways, fake, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-first\nsk-second\n")
    gateway = gateways("--api_keys_file=%s" % keys)
    await gateway.started()
    uuid = uuid_of(await submit(gateway, {"Authorization": "Bearer sk-first"}))
    assert await gateway.stopped() == 0
    keys.write_text("sk-second\n")  # the first key is revoked: its line goes
    gateway = gateways("--api_keys_file=%s" % keys)
    await gateway.started()
    assert (await gateway.fetch("/v1/tasks/%s" % uuid, headers={"Authorization": "Bearer sk-second"})).code == 404


@pytest.mark.gen_test(timeout=30)
async def test_a_second_gateway_on_the_same_database_is_refused(gateways, tmp_path):
    first = gateways()
    await first.started()
    second = gateways()
    assert await second.stopped(signum=None) == 1
    log = second.log()
    assert str(first.database) in log and str(first.proc.pid) in log and "in use by another gateway" in log
    assert (await first.fetch("/health")).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_workers_on_a_fresh_database_all_start(gateways, tmp_path):
    starts = []
    for wave in (range(5), range(5, 10)):  # 10 starts, 5 at a time (20 processes would crowd 2 cores)
        for i in wave:
            directory = tmp_path / ("fresh-%d" % i)
            directory.mkdir()
            starts.append(gateways("--processes=2", env={"ZIMAGE_DATABASE": str(directory / "db.sqlite3")}))
        await asyncio.gather(*(gateway.started(timeout=30) for gateway in starts[-5:]))

    def both_listening(gateway):
        return gateway.log().count(" listening on ") == 2
    for gateway in starts:
        await eventually(functools.partial(both_listening, gateway), timeout=10, interval=0.1, message=gateway.log)
        assert "locked" not in gateway.log() and "exited with" not in gateway.log()
    assert os.path.exists(tmp_path / "fresh-0" / "db.sqlite3")
