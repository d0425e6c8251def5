"""Reads that cannot be turned against the upstream or the gateway's memory: one upstream read per
task per interval whoever asks (one instance or a fleet), read limits per key and per network,
pictures fetched once and streamed with backpressure, clean error answers on kept-alive
connections, metrics for the operator."""

import asyncio
import hashlib
import http.client
import json
import time

import pytest
from tornado.testing import bind_unused_port

from helpers import eventually, port_of, rss_kib
from zimage_tornado.fake_upstream import noise_png

CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}


@pytest.mark.gen_test(timeout=30)
async def test_a_thousand_reads_of_a_running_task_make_one_upstream_read_per_interval(make_proxy, fake):
    fake.outcome = "never"
    uuid = fake.add_task("made elsewhere")  # no loop of this gateway follows it
    proxy = make_proxy(poll_interval=2.0, ip_reads_per_minute=0)
    started = time.monotonic()
    for _ in range(1000):
        assert (await proxy.request("/v1/tasks/%s" % uuid)).code == 200
    elapsed = time.monotonic() - started
    assert fake.task_reads[uuid] <= 1 + elapsed / 2.0, (fake.task_reads[uuid], elapsed)


@pytest.mark.gen_test(timeout=60)
async def test_a_fleet_reads_a_task_once_per_interval_however_many_ask(gateways, fake, redis_server):
    fake.outcome = "never"
    uuid = fake.add_task("made elsewhere")
    members = [gateways("--redis_url=%s" % redis_server.url, "--poll_interval=1", "--ip_reads_per_minute=0")
               for _ in range(3)]
    for member in members:
        await member.started()
    started = time.monotonic()
    for i in range(600):
        assert (await members[i % 3].fetch("/v1/tasks/%s" % uuid)).code == 200
    elapsed = time.monotonic() - started
    assert fake.task_reads[uuid] <= 1 + elapsed / 1.0, (fake.task_reads[uuid], elapsed)


@pytest.mark.gen_test(timeout=30)
async def test_a_key_over_its_reads_per_minute_gets_429_and_another_key_does_not(make_proxy, fake, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice"\nreads_per_minute = 5\n[keys.bob]\nkey = "sk-bob"\n')
    proxy = make_proxy(api_keys_file=str(keys))
    alice, bob = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-bob"}
    uuid = json.loads((await proxy.request("/v1/chat/completions", "POST", CHAT, headers=alice)).body)[
        "choices"][0]["message"]["content"]
    for i in range(5):
        answer = await proxy.request("/v1/tasks/%s" % uuid, headers=alice)
        assert answer.code == 200 and answer.headers["x-ratelimit-remaining-reads"] == str(4 - i)
    refused = await proxy.request("/v1/images/%s" % uuid, headers=alice)
    assert refused.code == 429 and json.loads(refused.body)["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["Retry-After"]) > 0 and refused.headers["x-ratelimit-limit-reads"] == "5"
    assert fake.task_reads[uuid] <= 2
    other = await proxy.request("/v1/tasks/%s" % uuid, headers=bob)  # a 404 (not bob's), not a 429
    assert other.code == 404 and other.headers["x-ratelimit-limit-reads"] == "600"  # the setting's default


@pytest.mark.gen_test(timeout=30)
async def test_addresses_of_one_ipv6_network_share_one_limit(make_proxy, fake):
    proxy = make_proxy(trusted_proxies="127.0.0.1", ip_requests_per_minute=3)
    codes = []
    for i in range(10):  # one host rotating addresses inside its /64
        answer = await proxy.request("/v1/chat/completions", "POST", CHAT,
                                     headers={"X-Forwarded-For": "2001:db8:1:2::%x" % (i + 1)})
        codes.append(answer.code)
    assert codes == [200] * 3 + [429] * 7
    other = await proxy.request("/v1/chat/completions", "POST", CHAT, headers={"X-Forwarded-For": "2001:db8:1:3::1"})
    assert other.code == 200  # another /64 is another client
    assert fake.calls["generate"] == 4


@pytest.mark.gen_test(timeout=60)
async def test_stalled_readers_of_a_large_picture_hold_no_copy_of_it(gateways, fake):
    picture = noise_png(2240)  # a real PNG of 15 MiB (the gateway verifies what it serves)
    fake.image_override = picture
    gateway = gateways("--ip_reads_per_minute=0", "--write_timeout=60")
    await gateway.started()
    uuid = json.loads((await gateway.fetch("/v1/chat/completions", method="POST", body=json.dumps(CHAT))).body)[
        "choices"][0]["message"]["content"]
    assert (await gateway.fetch("/v1/images/%s" % uuid)).code == 200  # completed
    before = rss_kib(gateway.proc.pid) / 1024
    stalled = []
    for _ in range(60):  # ask, and never read
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /v1/images/%s/0 HTTP/1.1\r\nHost: x\r\n\r\n" % uuid.encode())
        stalled.append(writer)
    await asyncio.sleep(3)
    grown = rss_kib(gateway.proc.pid) / 1024 - before
    assert fake.images_served <= 2, fake.images_served
    assert grown < 100, "RSS grew by %.0f MiB" % grown
    whole = await gateway.fetch("/v1/images/%s/0" % uuid)
    assert whole.code == 200 and hashlib.sha256(whole.body).digest() == hashlib.sha256(picture).digest()
    assert whole.headers["X-Content-Type-Options"] == "nosniff" and whole.headers["Content-Type"] == "image/png"
    for writer in stalled:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_after_an_early_error_the_next_request_on_the_connection_succeeds(gateways, io_loop):
    gateway = gateways("--api_keys=sk-a", "--max_body_bytes=100")
    await gateway.started()

    def session():
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        seen = []
        for method, path, body, key in (("GET", "/v1/models", None, None), ("GET", "/nowhere", None, "sk-a"),
                                        ("DELETE", "/v1/models", None, "sk-a"),
                                        ("POST", "/v1/chat/completions", b"x" * 500, "sk-a"),
                                        ("GET", "/v1/models", None, "sk-a")):
            connection.request(method, path, body=body, headers={"Authorization": "Bearer %s" % key} if key else {})
            answer = connection.getresponse()
            answer.read()
            seen.append(answer.status)
        return seen
    assert await io_loop.run_in_executor(None, session) == [401, 404, 405, 413, 200]  # no RemoteDisconnected


@pytest.mark.gen_test(timeout=30)
async def test_metrics_on_a_listener_of_their_own(gateways, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.ops]\nkey = "sk-ops"\nadmin = true\n')
    sock, port = bind_unused_port()
    sock.close()
    gateway = gateways("--api_keys_file=%s" % keys, "--metrics_port=%d" % port)
    await gateway.started()
    assert (await gateway.fetch("/metrics")).code == 401
    assert (await gateway.fetch("/metrics", headers={"Authorization": "Bearer sk-ops"})).code == 200

    async def scraped():
        try:
            answer = await gateway.http.fetch("http://127.0.0.1:%d/metrics" % port, raise_error=False)
        except OSError:
            return None
        return answer.code == 200 and b"zimage_http_requests_total" in answer.body
    await eventually(scraped, timeout=5, interval=0.1)
    assert port_of(gateway.url) != port


@pytest.mark.gen_test(timeout=30)
async def test_upstream_reads_are_spread_by_one_bucket_and_wait_out_a_429(make_proxy, fake):
    fake.outcome = "never"
    uuids = [fake.add_task("elsewhere %d" % i) for i in range(40)]
    proxy = make_proxy(upstream_reads_per_second=20, ip_reads_per_minute=0, poll_interval=5)
    answers = await asyncio.gather(*(proxy.request("/v1/tasks/%s" % uuid) for uuid in uuids))
    assert [a.code for a in answers] == [200] * 40  # spread, never refused
    times = sorted(t for uuid in uuids for t in fake.read_times[uuid])
    # a second's burst of 20, then 20 more at 20 a second: about 1 s, less the first reads' own
    # connection set-up (the bucket starts with the first turn taken, not the first read arrived);
    # unpaced, all 40 arrive within a few hundredths of a second
    assert times[-1] - times[0] >= 0.7
    fake.inject("task", "429")  # the upstream asks everyone to wait a second
    late = fake.add_task("after the 429")
    assert (await proxy.request("/v1/tasks/%s" % late)).code == 429
    started = time.monotonic()
    assert (await proxy.request("/v1/tasks/%s" % fake.add_task("next"))).code == 200
    assert time.monotonic() - started >= 0.9  # held for its Retry-After
