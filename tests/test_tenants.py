"""Many users, one gateway: named keys with limits, ownership, and the usage record on a real
SQLite file. Against real gateway processes and the fake upstream; where a test must move the
clock (a minute's rate window, a UTC day), an in-process gateway on real sockets and a real file."""

import asyncio
import json
import subprocess
import sys

import pytest
from conftest import ROOT

from zimage_tornado.tenants import Plan, load_keys

CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}
DAY = 86400


def keys_file(tmp_path, text):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return str(path)


TEAM = """
[defaults]
requests_per_minute = 100
[keys.alice]
key = "sk-alice"
images_per_day = 4
max_waiters = 1
[keys.bob]
key = "sk-bob"
[keys.ops]
key = "sk-ops"
admin = true
"""
ALICE, BOB, OPS = ({"Authorization": "Bearer sk-%s" % name} for name in ("alice", "bob", "ops"))


def body_of(response):
    return json.loads(response.body)


async def submit(gateway, headers, n=1, **extra):
    return await gateway.fetch("/v1/chat/completions", method="POST",
                               body=json.dumps({**CHAT, "batch_size": n, **extra}), headers=headers)


def uuid_of(response):
    return body_of(response)["choices"][0]["message"]["content"]


# -- the keys file ---------------------------------------------------------------------------

def test_toml_keys_have_names_limits_defaults_and_admins(tmp_path):
    import hashlib
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    ring = load_keys("sk-plain", keys_file(tmp_path, TEAM + '[keys.hashed]\nkey_sha256 = "%s"\n' % digest))
    plain = "key-" + hashlib.sha256(b"sk-plain").hexdigest()[:8]
    assert ring.names == ("alice", "bob", "ops", "hashed", plain)
    alice = ring.identify("Bearer sk-alice")
    assert alice.plan == Plan(requests_per_minute=100, images_per_day=4, max_waiters=1)
    assert ring.identify("Bearer sk-ops").admin and not alice.admin
    assert ring.identify("Bearer sk-hashed").name == "hashed"  # the file need not hold the secret
    assert ring.identify("Bearer sk-plain").name == plain  # named by its hash, not its line
    assert ring.identify("Bearer sk-nobody") is None and ring.identify("sk-alice") is None


@pytest.mark.parametrize("text, says", [
    ('[keys.a]\nkey = "x"\nkey_sha256 = "%s"\n' % ("0" * 64), "exactly one of key and key_sha256"),
    ('[keys.a]\nkey_sha256 = "nothex"\n', "64 hex digits"),
    ('[keys."bad name"]\nkey = "x"\n', "key name"),
    ('[keys.a]\nkey = "x"\nimages_per_day = -1\n', "images_per_day must be a whole number"),
    ('[keys.a]\nkey = "x"\nadmin = "yes"\n', "admin must be true or false"),
    ('[keys.a]\nkey = "x"\nquota = 3\n', "unknown field quota"),
    ('[keys.a]\nkey = "x"\n[keys.b]\nkey = "x"\n', "the same key is listed twice"),
    ("[keys\n", "api_keys_file"),
    ('[keys.anonymous]\nkey = "x"\n', "the gateway's own name"),  # it could not read its own tasks
])
def test_a_bad_keys_file_stops_the_server_with_a_message(tmp_path, text, says):
    path = keys_file(tmp_path, text)
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        load_keys("", path)
    result = subprocess.run([sys.executable, "-m", "zimage_tornado", "--api_keys_file=%s" % path], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr


# -- limits -----------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_the_rate_limit_is_hit_then_recovers_after_retry_after(make_proxy, fake, tmp_path):
    now = [1_800_000_000.0]
    proxy = make_proxy(clock=lambda: now[0], database=str(tmp_path / "db.sqlite3"),
                       api_keys_file=keys_file(tmp_path, '[keys.alice]\nkey = "sk-alice"\nrequests_per_minute = 2\n'))
    first = await proxy.request("/v1/chat/completions", "POST", CHAT, headers=ALICE)
    assert first.code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    now[0] += 10
    assert (await proxy.request("/v1/chat/completions", "POST", CHAT, headers=ALICE)).code == 200
    now[0] += 10
    refused = await proxy.request("/v1/chat/completions", "POST", CHAT, headers=ALICE)
    assert refused.code == 429 and body_of(refused)["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["Retry-After"] == "40"  # the first request leaves the window then
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in refused.headers  # retrying later helps
    assert fake.calls["generate"] == 2  # nothing reached the upstream
    now[0] += 39
    assert (await proxy.request("/v1/chat/completions", "POST", CHAT, headers=ALICE)).code == 429
    now[0] += 1.5
    assert (await proxy.request("/v1/chat/completions", "POST", CHAT, headers=ALICE)).code == 200
    assert fake.calls["generate"] == 3


@pytest.mark.gen_test(timeout=30)
async def test_the_daily_quota_is_spent_then_reset_at_the_utc_day_boundary(make_proxy, fake, tmp_path):
    midnight = 1_800_057_600.0  # a UTC midnight
    now = [midnight - 120]
    proxy = make_proxy(clock=lambda: now[0], database=str(tmp_path / "db.sqlite3"),
                       api_keys_file=keys_file(tmp_path, TEAM))
    ok = await proxy.request("/v1/chat/completions", "POST", {**CHAT, "batch_size": 3}, headers=ALICE)
    assert ok.code == 200 and ok.headers["x-ratelimit-remaining-images"] == "1"
    assert ok.headers["x-ratelimit-limit-images"] == "4" and ok.headers["x-ratelimit-reset-images"] == "2m0s"
    spent = await proxy.request("/v1/chat/completions", "POST", {**CHAT, "batch_size": 2}, headers=ALICE)
    assert spent.code == 429 and body_of(spent)["error"]["code"] == "insufficient_quota"
    assert spent.headers["x-should-retry"] == "false" and spent.headers["Retry-After"] == "120"
    assert (await proxy.request("/v1/chat/completions", "POST", CHAT, headers=ALICE)).code == 200  # the last one
    assert (await proxy.request("/v1/chat/completions", "POST", CHAT, headers=BOB)).code == 200  # bob has none
    now[0] = midnight + 1
    fresh = await proxy.request("/v1/chat/completions", "POST", {**CHAT, "batch_size": 4}, headers=ALICE)
    assert fresh.code == 200 and fresh.headers["x-ratelimit-remaining-images"] == "0"
    assert fake.calls["generate"] == 4


@pytest.mark.gen_test(timeout=30)
async def test_images_are_given_back_when_the_upstream_refuses_the_job(gateways, fake, tmp_path):
    gateway = gateways("--api_keys_file=%s" % keys_file(tmp_path, TEAM))
    await gateway.started()
    fake.inject("generate", "400")
    refused = await submit(gateway, ALICE, n=3)
    assert refused.code == 400 and body_of(refused)["error"]["code"] == "upstream_rejected"
    ok = await submit(gateway, ALICE, n=4)  # the 3 were refunded: all 4 are still there
    assert ok.code == 200 and ok.headers["x-ratelimit-remaining-images"] == "0"


@pytest.mark.gen_test(timeout=30)
async def test_a_keys_waiter_cap_refuses_its_next_waiter_while_other_keys_wait(gateways, fake, tmp_path):
    gateway = gateways("--api_keys_file=%s" % keys_file(tmp_path, TEAM))
    await gateway.started()
    fake.outcome = "never"
    alice_task, bob_task = uuid_of(await submit(gateway, ALICE)), uuid_of(await submit(gateway, BOB))
    waiting = asyncio.ensure_future(gateway.fetch("/v1/images/%s?timeout=3" % alice_task, headers=ALICE))
    bobs = [asyncio.ensure_future(gateway.fetch("/v1/images/%s?timeout=3" % bob_task, headers=BOB)) for _ in range(3)]
    await asyncio.sleep(0.5)
    second = await gateway.fetch("/v1/images/%s?timeout=3" % alice_task, headers=ALICE)
    assert second.code == 429 and body_of(second)["error"]["code"] == "too_many_waiters"
    assert [r.code for r in await asyncio.gather(waiting, *bobs)] == [504] * 4  # they all waited to the end
    assert (await gateway.fetch("/v1/images/%s?timeout=0.2" % alice_task, headers=ALICE)).code == 504  # free again
    metrics = (await gateway.fetch("/metrics", headers=OPS)).body.decode()
    assert 'zimage_refused_total{key="alice",reason="too_many_waiters"} 1.0' in metrics


@pytest.mark.gen_test(timeout=30)
async def test_ip_limits_apply_without_keys_and_a_spoofed_forwarded_for_cannot_reset_them(gateways, fake):
    gateway = gateways("--ip_requests_per_minute=2")
    await gateway.started()
    codes = []
    for i in range(4):
        response = await gateway.fetch("/v1/chat/completions", method="POST", body=json.dumps(CHAT),
                                       headers={"X-Forwarded-For": "203.0.113.%d" % i})
        codes.append(response.code)
    assert codes == [200, 200, 429, 429]
    assert fake.calls["generate"] == 2


# -- ownership --------------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_another_keys_task_does_not_exist_for_it_but_admins_read_every_task(gateways, fake, tmp_path):
    gateway = gateways("--api_keys_file=%s" % keys_file(tmp_path, TEAM))
    await gateway.started()
    task_uuid = uuid_of(await submit(gateway, ALICE))
    missing = await gateway.fetch("/v1/tasks/00000000-0000-0000-0000-000000000000", headers=BOB)
    for path in ("/v1/tasks/%s", "/v1/images/%s", "/v1/images/%s?wait=false"):
        other = await gateway.fetch(path % task_uuid, headers=BOB)
        assert other.code == 404 and body_of(other)["error"]["code"] == "task_not_found"
        assert body_of(other)["error"]["type"] == body_of(missing)["error"]["type"]
        assert (await gateway.fetch(path % task_uuid, headers=ALICE)).code in (200, 202)
        assert (await gateway.fetch(path % task_uuid, headers=OPS)).code in (200, 202)
    assert fake.task_reads.get("00000000-0000-0000-0000-000000000000", 0) == 0  # not even asked upstream


@pytest.mark.gen_test(timeout=30)
async def test_task_visibility_any_lets_every_key_read_every_task(gateways, fake, tmp_path):
    gateway = gateways("--api_keys_file=%s" % keys_file(tmp_path, TEAM), "--task_visibility=any")
    await gateway.started()
    task_uuid = uuid_of(await submit(gateway, ALICE))
    assert (await gateway.fetch("/v1/images/%s" % task_uuid, headers=BOB)).code == 200


# -- a restart keeps what it promises ----------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_restart_keeps_quota_ownership_and_idempotency(gateways, fake, tmp_path):
    keys = "--api_keys_file=%s" % keys_file(tmp_path, TEAM)
    first = gateways(keys)
    await first.started()
    kept = await submit(first, {**ALICE, "Idempotency-Key": "order-1"}, n=3)
    assert kept.code == 200
    assert await first.stopped() == 0

    second = gateways(keys)  # the same database file
    await second.started()
    replay = await submit(second, {**ALICE, "Idempotency-Key": "order-1"}, n=3)
    assert uuid_of(replay) == uuid_of(kept)
    assert fake.calls["generate"] == 1  # not paid twice across the restart
    assert (await submit(second, ALICE, n=2)).code == 429  # 3 of 4 images spent before the restart
    assert (await second.fetch("/v1/images/%s" % uuid_of(kept), headers=BOB)).code == 404
    assert (await second.fetch("/v1/images/%s" % uuid_of(kept), headers=ALICE)).code == 200
    assert await second.stopped() == 0


# -- the usage record --------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_the_usage_endpoints_and_the_cli_agree_with_what_was_submitted(gateways, fake, tmp_path):
    gateway = gateways("--api_keys_file=%s" % keys_file(tmp_path, TEAM))
    await gateway.started()
    done = [uuid_of(await submit(gateway, ALICE, n=2)), uuid_of(await submit(gateway, BOB, n=1))]
    for task_uuid, who in zip(done, (ALICE, BOB)):
        assert (await gateway.fetch("/v1/images/%s" % task_uuid, headers=who)).code == 200
    fake.outcome = "fail"
    failed = uuid_of(await submit(gateway, BOB, n=1, negative_prompt="blur"))
    assert (await gateway.fetch("/v1/images/%s" % failed, headers=BOB)).code == 502
    assert (await submit(gateway, ALICE, n=3)).code == 429  # refused: quota

    assert (await gateway.fetch("/admin/usage")).code == 401
    assert (await gateway.fetch("/admin/usage", headers=BOB)).code == 403
    assert (await gateway.fetch("/admin/usage?since=2026-13-01", headers=OPS)).code == 400
    usage = body_of(await gateway.fetch("/admin/usage", headers=OPS))["data"]
    by_key = {row["key"]: row for row in usage}
    assert (by_key["alice"]["tasks"], by_key["alice"]["images"], by_key["alice"]["refused"]) == (1, 2, 1)
    assert by_key["alice"]["refused_by_reason"] == {"insufficient_quota": 1}
    assert (by_key["bob"]["tasks"], by_key["bob"]["images"], by_key["bob"]["failed"]) == (2, 2, 1)
    only_bob = body_of(await gateway.fetch("/admin/usage?key=bob", headers=OPS))["data"]
    assert [row["key"] for row in only_bob] == ["bob"]

    tasks = body_of(await gateway.fetch("/admin/tasks?limit=2", headers=OPS))["data"]
    assert [t["uuid"] for t in tasks] == [failed, done[1]]  # newest first
    assert tasks[0]["status"] == "failed" and tasks[0]["error"] and tasks[0]["negative_prompt"] == "blur"
    assert tasks[1]["status"] == "completed" and tasks[1]["image_count"] == 1 and tasks[1]["client"] == "127.0.0.1"
    metrics = (await gateway.fetch("/metrics", headers=OPS)).body.decode()
    assert 'zimage_submits_total{key="bob"} 2.0' in metrics and 'zimage_images_total{key="alice"} 2.0' in metrics
    assert 'zimage_refused_total{key="alice",reason="insufficient_quota"} 1.0' in metrics
    assert await gateway.stopped() == 0

    cli = subprocess.run([sys.executable, "-m", "zimage_tornado", "usage", "--database", str(gateway.database),
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0, cli.stderr
    assert [json.loads(line) for line in cli.stdout.splitlines()] == usage
    table = subprocess.run([sys.executable, "-m", "zimage_tornado", "usage", "--database", str(gateway.database)],
                           cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    assert table.splitlines()[0].split() == ["key", "day", "tasks", "images", "failed", "refused"]
    assert len(table.splitlines()) == 2 + len(usage)


@pytest.mark.gen_test(timeout=30)
async def test_prompts_are_left_out_of_the_record_when_asked(gateways, fake, tmp_path):
    gateway = gateways("--api_keys_file=%s" % keys_file(tmp_path, TEAM), "--record_prompts=false")
    await gateway.started()
    await submit(gateway, ALICE)
    tasks = body_of(await gateway.fetch("/admin/tasks", headers=OPS))["data"]
    assert tasks[0]["prompt"] is None and tasks[0]["negative_prompt"] is None


def test_the_usage_cli_says_what_is_wrong_without_a_traceback(tmp_path):
    for args, says in ((["--database", str(tmp_path / "none.sqlite3")], "no such file"),
                       (["--since", "yesterday"], "since must be a day")):
        result = subprocess.run([sys.executable, "-m", "zimage_tornado", "usage", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and says in result.stderr and "Traceback" not in result.stderr
