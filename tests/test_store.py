"""The store interface, against each implementation: a real SQLite file and a real redis-server
started by the test. What the gateway relies on, said once for both."""

import asyncio
import time

import pytest

from zimage_tornado.store import TaskRecord, utc_day
from zimage_tornado.store.redis import RedisStore
from zimage_tornado.store.sqlite import SqliteStore
from zimage_tornado.tenants import Plan

NOW = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    stores = []

    def make():
        if request.param == "sqlite":
            store = SqliteStore(str(tmp_path / "store.sqlite3"), record_ttl=86400, clock=lambda: NOW)
        else:
            store = RedisStore(request.getfixturevalue("redis_server").url, timeout=2, record_ttl=86400)
        store.open()
        stores.append(store)
        return store

    yield make


async def settled(store):
    """Writes nobody waits for leave with the next outbox: close() sends them."""
    await store.close()


@pytest.mark.gen_test(timeout=20)
async def test_admission_counts_a_rate_window_and_a_daily_quota_and_refunds(make_store):
    store = make_store()
    await store.ready()
    plan = Plan(requests_per_minute=2, images_per_day=5)
    first = await store.admit("key:a", plan, 2, NOW)
    assert first.allowed and first.requests.remaining == 1 and first.images.remaining == 3
    second = await store.admit("key:a", plan, 2, NOW + 1)
    assert second.allowed and second.images.remaining == 1
    rate = await store.admit("key:a", plan, 1, NOW + 2)
    assert not rate.allowed and rate.reason == "rate_limit_exceeded" and rate.retry_after == pytest.approx(58)
    quota = await store.admit("key:a", plan, 2, NOW + 61)  # the window has room, the day has 1 image left
    assert not quota.allowed and quota.reason == "insufficient_quota"
    await store.refund("key:a", second.day, 2)
    await asyncio.sleep(0.2)  # the refund leaves with the outbox
    assert (await store.admit("key:a", plan, 2, NOW + 62)).allowed
    assert (await store.admit("key:b", plan, 5, NOW + 62)).allowed  # scopes are apart
    await settled(store)


@pytest.mark.gen_test(timeout=20)
async def test_idempotency_claims_are_exclusive_until_fulfilled_or_released(make_store):
    store = make_store()
    mine = await store.claim("key:a", "k", "digest-1", 30, NOW, "boot")
    assert mine.mine
    theirs = await store.claim("key:a", "k", "digest-1", 30, NOW, "boot")
    assert not theirs.mine and theirs.uuid is None and theirs.digest == "digest-1"
    await store.fulfil("key:a", "k", "task-1", 3600, NOW)
    assert (await store.claim("key:a", "k", "digest-2", 30, NOW, "boot")).uuid == "task-1"
    assert (await store.claim("key:b", "k", "digest-2", 30, NOW, "boot")).mine  # another caller's key is another key
    await store.release("key:b", "k")
    await asyncio.sleep(0.2)
    assert (await store.claim("key:b", "k", "digest-3", 30, NOW, "boot")).mine  # released: usable again
    await settled(store)


@pytest.mark.gen_test(timeout=20)
async def test_the_usage_record_names_owners_and_adds_up_per_key_and_day(make_store):
    store = make_store()
    day = utc_day(NOW)
    for uuid, key, n in (("t1", "alice", 2), ("t2", "alice", 1), ("t3", "bob", 4)):
        await store.record_task(TaskRecord(uuid, key, "127.0.0.1", "zimage-turbo", 512, 512, n, 8, "a fox", "",
                                           NOW + len(uuid)))
    await store.finish_task("t2", "failed", NOW + 9, 0, "could not draw", [])
    await store.finish_task("t3", "completed", NOW + 9, 4, None, ["https://img/x.png"])
    await store.count_refusal("alice", "insufficient_quota", NOW)
    await asyncio.sleep(0.2)
    assert await store.owner("t1") == "alice" and await store.owner("nope") is None
    rows = {(row.key, row.day): row for row in await store.usage(day, day)}
    alice, bob = rows[("alice", day)], rows[("bob", day)]
    assert (alice.tasks, alice.images, alice.failed, alice.refused) == (2, 3, 1, 1)
    assert alice.refused_by_reason == {"insufficient_quota": 1}
    assert (bob.tasks, bob.images, bob.failed) == (1, 4, 0)
    assert [r.key for r in await store.usage(day, day, "bob")] == ["bob"]
    recent = await store.recent_tasks(None, 10)
    assert {r.uuid for r in recent} == {"t1", "t2", "t3"}
    done = next(r for r in recent if r.uuid == "t3")
    assert done.status == "completed" and done.image_urls == ["https://img/x.png"]
    assert [r.uuid for r in await store.recent_tasks("bob", 10)] == ["t3"]
    await settled(store)


@pytest.mark.gen_test(timeout=60)
async def test_rate_windows_of_scopes_that_never_return_do_not_pile_up(tmp_path):
    store = SqliteStore(str(tmp_path / "store.sqlite3"), record_ttl=86400)
    store.open()
    plan = Plan(requests_per_minute=10)
    started = time.time()
    for i in range(20_000):  # a client spraying from ever new addresses (live windows are kept:
        await store.admit("ip:2001:db8::%x" % i, plan, 1, started)  # a per-address limit needs them)
    await store.admit("ip:192.0.2.1", plan, 1, started + 61)  # a minute on, the expired windows are gone
    assert len(store._hits) == 1
    await store.close()


@pytest.mark.gen_test(timeout=20)
async def test_tasks_are_found_by_filters_a_page_at_a_time_and_learn_their_end(make_store):
    from zimage_tornado.store import TaskQuery
    store = make_store()
    await store.ready()
    for i in range(5):
        await store.record_task(TaskRecord("t%d" % i, "alice" if i % 2 else "bob", "127.0.0.1", "zimage-turbo", 512,
                                           512, 1, 8, "p%d" % i, "", NOW + i, end_user="u%d" % (i % 2)))
    first = await store.find_tasks(TaskQuery(limit=2))
    assert [t.uuid for t in first] == ["t4", "t3"]
    rest = await store.find_tasks(TaskQuery(before=first[-1].submitted_at, limit=10))
    assert [t.uuid for t in rest] == ["t2", "t1", "t0"]
    assert [t.uuid for t in await store.find_tasks(TaskQuery(key="alice"))] == ["t3", "t1"]
    assert [t.uuid for t in await store.find_tasks(TaskQuery(end_user="u0"))] == ["t4", "t2", "t0"]
    assert (await store.get_task("t2")).prompt == "p2" and await store.get_task("nope") is None
    assert await store.last_seen(["alice", "bob", "carol"]) == {"alice": NOW + 3, "bob": NOW + 4}
    assert sorted(uuid for uuid, _ in await store.unfinished(10)) == ["t0", "t1", "t2", "t3", "t4"]
    await store.finish_task("t0", "expired", NOW + 10, 0, "not finished", [])
    await store.finish_task("t1", "completed", NOW + 10, 1, None, ["https://img/1.png"])
    await asyncio.sleep(0.2)
    await store.finish_task("t0", "completed", NOW + 20, 1, None, ["https://img/0.png"])  # its real end, later
    await store.finish_task("t1", "failed", NOW + 20, 0, "late news", [])  # a final state stays final
    await asyncio.sleep(0.2)
    assert (await store.get_task("t0")).status == "completed" and (await store.get_task("t1")).status == "completed"
    assert [t.uuid for t in await store.find_tasks(TaskQuery(status="submitted"))] == ["t4", "t3", "t2"]
    await settled(store)


@pytest.mark.gen_test(timeout=20)
async def test_webhook_messages_are_written_with_the_end_leased_once_and_kept_to_their_end(make_store):
    from zimage_tornado.store import Notice, WebhookMessage

    store = make_store()
    await store.ready()
    url = "https://hooks.example.com/in"
    await store.record_task(TaskRecord("t-hooked", "alice", "-", "m", 64, 64, 1, 8, "p", None, NOW,
                                       webhook_url=url, webhook_events=["task.completed"]))
    await store.record_task(TaskRecord("t-plain", "alice", "-", "m", 64, 64, 1, 8, "p", None, NOW))
    await store.finish_task("t-hooked", "completed", NOW + 1, 1, None, ["u"], Notice("msg_a", "task.completed", "{}",
                                                                                      NOW + 1))
    await store.finish_task("t-plain", "completed", NOW + 1, 1, None, ["u"], Notice("msg_b", "task.completed", "{}",
                                                                                     NOW + 1))
    # a second sight of the end (another instance, a resent write) makes no second message
    await store.finish_task("t-hooked", "completed", NOW + 2, 1, None, ["u"], Notice("msg_c", "task.completed", "{}",
                                                                                      NOW + 2))
    await asyncio.sleep(0.2)  # final states leave with the outbox
    assert [m.id for m in await store.find_webhooks(None, None, 10)] == ["msg_a"]  # only the subscribed task's
    assert await store.webhook_backlog() == (1, pytest.approx(NOW + 1))
    claimed = await store.claim_webhooks(NOW + 5, 10, 30)
    assert [(m.id, m.key, m.url, m.body) for m in claimed] == [("msg_a", "alice", url, "{}")]
    assert await store.claim_webhooks(NOW + 6, 10, 30) == []  # leased: nobody else takes it meanwhile
    message = claimed[0]
    message.attempts, message.next_at, message.last_status, message.last_error = 1, NOW + 40, 500, "HTTP 500"
    await store.webhook_attempted(message)
    assert await store.claim_webhooks(NOW + 39, 10, 30) == []
    assert [m.attempts for m in await store.claim_webhooks(NOW + 41, 10, 30)] == [1]
    message.status, message.next_at, message.last_status, message.last_error = "delivered", None, 200, None
    await store.webhook_attempted(message)
    assert await store.claim_webhooks(NOW + 1000, 10, 30) == []
    assert (await store.get_webhook("msg_a")).status == "delivered"
    assert (await store.webhook_backlog())[0] == 0
    # 410: the URL is disabled for alice, until an admin's retry
    await store.disable_url("alice", url, NOW)
    assert await store.url_disabled("alice", url) and not await store.url_disabled("bob", url)
    retried = await store.retry_webhook("msg_a", NOW + 2000)
    assert retried.status == "pending" and not await store.url_disabled("alice", url)
    assert [m.id for m in await store.claim_webhooks(NOW + 2000, 10, 30)] == ["msg_a"]
    assert await store.retry_webhook("msg_none", NOW) is None
    await store.add_webhook(WebhookMessage("msg_p", "bob", "t-plain", "task.progress", url, "{}", NOW + 3,
                                           next_at=NOW + 3))
    await asyncio.sleep(0.2)
    assert [m.id for m in await store.find_webhooks("bob", "pending", 10)] == ["msg_p"]
    assert await store.find_webhooks("bob", "delivered", 10) == []
    await settled(store)
