"""What a hostile review of an exposed gateway found, each against a real gateway process and the
fake upstream: hostile clients, key holders against each other, and a hostile or broken upstream
(or whoever controls its image URLs)."""

import asyncio
import json
import logging
import re
import subprocess
import sys

import pytest
from conftest import ROOT, serve

from helpers import eventually, exchange
from tornado.simple_httpclient import HTTPStreamClosedError
from zimage_tornado.fake_upstream import FakeZImage
from zimage_tornado.upstream import ImageTooLarge

CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}


def body_of(response):
    return json.loads(response.body)


async def post(gateway, path, body, **headers):
    return await gateway.fetch(path, method="POST", body=json.dumps(body), headers=headers)


@pytest.fixture
def elsewhere(io_loop):
    """A second fake on its own loopback port: an internal service the gateway must not fetch."""
    fake = FakeZImage()
    server, port = serve(fake.make_app())
    fake.url = "http://127.0.0.1:%d" % port
    yield fake
    server.stop()


# -- anyone, no key needed -------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_junk_methods_do_not_grow_the_metrics(gateways):
    gateway = gateways()
    await gateway.started()
    before = len((await gateway.fetch("/metrics")).body)
    for batch in range(4):
        await asyncio.gather(*(exchange(gateway.url, b"JUNK%dX%d /v1/models HTTP/1.1\r\nHost: x\r\n"
                                                     b"Connection: close\r\n\r\n" % (batch, i)) for i in range(100)))
    metrics = (await gateway.fetch("/metrics")).body.decode()
    assert "JUNK" not in metrics
    assert 'method="other"' in metrics
    assert len(metrics) - before < 4000  # one new series of each kind, not 400


@pytest.mark.gen_test(timeout=60)
async def test_options_announcing_a_body_is_refused_and_cannot_delay_a_stop(gateways):
    gateway = gateways("--body_timeout=0.5", "--shutdown_timeout=10")
    await gateway.started()
    writers = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"OPTIONS /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        writers.append((reader, writer))
    answer = await asyncio.wait_for(writers[0][0].read(), 5)
    assert answer.startswith(b"HTTP/1.1 400") and b"unexpected_body" in answer

    async def none_in_flight():
        return body_of(await gateway.fetch("/health/ready"))["requests_in_flight"] == 0
    await eventually(none_in_flight, 5, 0.05)
    started = asyncio.get_running_loop().time()
    assert await gateway.stopped() == 0
    assert asyncio.get_running_loop().time() - started < 5  # not the whole shutdown_timeout
    for _, writer in writers:
        writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_the_listen_backlog_defaults_to_the_kernel_limit(gateways):
    gateway = gateways()
    await gateway.started()
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    listing = subprocess.run(["ss", "-Hltn", "sport = :%d" % gateway.port], capture_output=True, text=True).stdout
    assert int(listing.split()[2]) == somaxconn  # for a listening socket, Send-Q is its backlog


@pytest.mark.gen_test(timeout=30)
async def test_odd_input_is_a_400_before_anything_reaches_the_upstream(gateways, fake):
    gateway = gateways()
    await gateway.started()
    surrogate = b'{"model": "\\udcff", "prompt": "a fox"}'
    for extra in (b"", b', "stream": true, "wait": true'):
        response = await gateway.fetch("/v1/chat/completions", method="POST", body=surrogate[:-1] + extra + b"}")
        assert response.code == 400 and body_of(response)["error"]["param"] == "model"
    prompt = await post(gateway, "/v1/images/generations", {"prompt": "a fox \udcff"})
    assert prompt.code == 400
    nested = await gateway.fetch("/v1/chat/completions", method="POST", body="[" * 100000 + "]" * 100000)
    assert nested.code == 400 and body_of(nested)["error"]["code"] == "invalid_json"
    digit = await exchange(gateway.url, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ²\r\n"
                                        "Connection: close\r\n\r\n".encode())
    assert digit.startswith(b"HTTP/1.1 400")
    assert fake.calls["generate"] == 0
    assert "Traceback" not in gateway.log()


@pytest.mark.gen_test(timeout=30)
async def test_an_upstream_echoing_a_lone_surrogate_is_answered_normally(gateways, fake):
    gateway = gateways()
    await gateway.started()
    task_uuid = fake.add_task("a fox \udcff")
    assert (await gateway.fetch("/v1/tasks/%s" % task_uuid)).code == 200
    images = await gateway.fetch("/v1/images/%s" % task_uuid)
    assert images.code == 200 and body_of(images)["task_info"]["prompt"] == "a fox \udcff"
    assert "Traceback" not in gateway.log()


@pytest.mark.parametrize("flag, says", [("--port=99999", "port must be between 1 and 65535"),
                                        ("--port=0", "port must be between 1 and 65535"),
                                        ("--poll_interval=abc", "poll_interval: expected a number, got 'abc'"),
                                        ("--chat_wait=maybe", "chat_wait: expected true or false")])
def test_bad_settings_stop_the_server_naming_the_setting(flag, says):
    result = subprocess.run([sys.executable, "-m", "zimage_tornado", flag], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr


# -- between key holders ---------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_idempotency_keys_are_scoped_to_the_caller(gateways, fake):
    gateway = gateways("--api_keys=sk-alice,sk-bob,sk-carol")
    await gateway.started()
    alice, bob = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-bob"}
    carol = {"Authorization": "Bearer sk-carol"}
    first = await post(gateway, "/v1/chat/completions", CHAT, **alice, **{"Idempotency-Key": "k1"})
    copy = await post(gateway, "/v1/chat/completions", CHAT, **carol, **{"Idempotency-Key": "k1"})
    probe = await post(gateway, "/v1/chat/completions", {**CHAT, "prompt": "else"}, **bob, **{"Idempotency-Key": "k1"})
    assert first.code == copy.code == 200 and probe.code == 200  # no oracle: Bob learns nothing of Alice's key
    assert body_of(first)["choices"][0]["message"]["content"] != body_of(copy)["choices"][0]["message"]["content"]
    squat = await post(gateway, "/v1/chat/completions", {**CHAT, "prompt": "squat"}, **bob, **{"Idempotency-Key": "k2"})
    real = await post(gateway, "/v1/chat/completions", CHAT, **alice, **{"Idempotency-Key": "k2"})
    assert squat.code == 200 and real.code == 200  # Bob's squat does not block Alice
    replay = await post(gateway, "/v1/chat/completions", CHAT, **alice, **{"Idempotency-Key": "k1"})
    assert body_of(replay)["choices"][0]["message"]["content"] == body_of(first)["choices"][0]["message"]["content"]
    assert fake.calls["generate"] == 5  # first, copy, probe, squat, real


@pytest.mark.gen_test(timeout=30)
async def test_an_idempotency_key_matches_the_normalised_request(gateways, fake):
    gateway = gateways()
    await gateway.started()
    implicit = await post(gateway, "/v1/chat/completions", CHAT, **{"Idempotency-Key": "k"})
    explicit = await post(gateway, "/v1/chat/completions", {**CHAT, "cfg_scale": 7.0, "steps": 8},
                          **{"Idempotency-Key": "k"})
    assert implicit.code == explicit.code == 200
    assert body_of(implicit)["id"] == body_of(explicit)["id"]
    assert fake.calls["generate"] == 1


# -- a hostile or broken upstream, or whoever controls the image URLs -------------------------

@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("::1", False), ("fe80::1", False), ("fc00::1", False),
    ("ff02::1", False), ("::", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False)])
def test_only_public_addresses_count_as_public(address, public):
    import ipaddress

    from zimage_tornado.images import is_public
    assert is_public(ipaddress.ip_address(address)) is public


async def b64(gateway, prompt, n=1, **headers):
    return await post(gateway, "/v1/images/generations", {"prompt": prompt, "n": n, "response_format": "b64_json"},
                      **headers)


@pytest.mark.gen_test(timeout=30)
async def test_images_are_never_fetched_from_a_private_address(gateways, fake, fake_url, elsewhere):
    gateway = gateways()
    await gateway.started()
    internal = elsewhere.url + "/images/%s_0.png" % elsewhere.add_task("secret")
    fake.result_urls["direct"] = [internal]
    fake.result_urls["redirected"] = [fake_url + "/redirect?to=" + internal]
    for prompt in ("direct", "redirected"):
        response = await b64(gateway, prompt)
        assert response.code == 502, response.body
        assert "non-public address" in body_of(response)["error"]["message"]
    assert fake.redirects == 1  # the first hop (the upstream's own origin) was followed, the second refused
    assert elsewhere.calls["image"] == 0


@pytest.mark.gen_test(timeout=30)
async def test_image_hosts_lets_a_listed_origin_through(gateways, fake, elsewhere):
    gateway = gateways("--image_hosts=%s" % elsewhere.url)
    await gateway.started()
    fake.result_urls["listed"] = [elsewhere.url + "/images/%s_0.png" % elsewhere.add_task("a listed host")]
    response = await b64(gateway, "listed")
    assert response.code == 200 and body_of(response)["data"][0]["b64_json"]
    assert elsewhere.calls["image"] == 1


@pytest.mark.gen_test(timeout=60)
async def test_image_downloads_stop_at_the_size_limit(gateways, fake):
    gateway = gateways("--max_image_bytes=1048576")
    await gateway.started()
    fake.always("image", "endless")
    started = asyncio.get_running_loop().time()
    response = await b64(gateway, "endless", n=4)
    assert response.code == 502 and "larger than 1048576 bytes" in body_of(response)["error"]["message"]
    assert asyncio.get_running_loop().time() - started < 10
    await asyncio.sleep(0.5)
    assert fake.image_bytes_sent < 4 * (1 + 8) * 2 ** 20  # the limit plus what socket buffers hold
    fake.always("image", "huge_length")
    sent = fake.image_bytes_sent
    response = await b64(gateway, "announced", n=1)
    assert response.code == 502 and "larger than" in body_of(response)["error"]["message"]
    await asyncio.sleep(0.5)
    assert fake.image_bytes_sent - sent < 9 * 2 ** 20
    assert "Traceback" not in gateway.log()  # stopping a download is not an error of the gateway's


@pytest.mark.gen_test(timeout=30)
async def test_a_wild_content_length_is_answered_as_too_large_without_a_traceback(gateways, fake):
    gateway = gateways("--max_image_bytes=1048576")
    await gateway.started()
    fake.always("image", "wild_length")
    response = await b64(gateway, "wild")
    assert response.code == 502 and "larger than 1048576 bytes" in body_of(response)["error"]["message"]
    assert "Traceback" not in gateway.log()


def test_a_download_stopped_at_the_limit_leaves_no_traceback_in_the_log(caplog):
    """Which of tornado's two log lines a stop leads to depends on timing (the fetch may have been
    cancelled by a sibling's failure first); both are kept out of the log, and nothing else is."""
    log = logging.getLogger("tornado.application")
    try:
        raise ImageTooLarge("An image is larger than 1048576 bytes")
    except ImageTooLarge as stop:
        log.error("Uncaught exception", exc_info=stop)
        try:
            raise HTTPStreamClosedError("Connection closed")
        except HTTPStreamClosedError as closed:  # raised while the stop was handled: its __context__
            log.error("Exception after Future was cancelled", exc_info=closed)
    unrelated = HTTPStreamClosedError("Connection closed")  # a failure of its own: still logged
    log.error("Exception after Future was cancelled", exc_info=unrelated)
    assert [r.exc_info[1] for r in caplog.records if r.name == "tornado.application"] == [unrelated]


@pytest.mark.gen_test(timeout=30)
async def test_no_more_urls_are_fetched_than_the_task_asked_for(gateways, fake, fake_url):
    gateway = gateways()
    await gateway.started()
    task_uuid = fake.add_task("a real picture")
    fake.result_urls["many"] = [fake_url + "/images/%s_0.png" % task_uuid] * 200
    response = await b64(gateway, "many", n=1)
    assert response.code == 200 and len(body_of(response)["data"]) == 1
    assert fake.calls["image"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_one_task_is_downloaded_once_however_often_it_is_asked_for(gateways, fake):
    gateway = gateways()
    await gateway.started()
    answers = await asyncio.gather(*(b64(gateway, "shared", n=4, **{"Idempotency-Key": "once"}) for _ in range(8)))
    answers += [await b64(gateway, "shared", n=4, **{"Idempotency-Key": "once"}) for _ in range(8)]
    assert all(answer.code == 200 for answer in answers)
    # the same pictures in every answer ("created" is each answer's own time, and may differ)
    assert len({json.dumps(body_of(answer)["data"]) for answer in answers}) == 1
    assert fake.calls["generate"] == 1 and fake.calls["image"] == 4


@pytest.mark.gen_test(timeout=30)
async def test_slow_images_do_not_starve_submits(gateways, fake):
    gateway = gateways("--upstream_max_clients=2")
    await gateway.started()
    fake.hang_seconds = 2.5
    fake.always("image", "hang")
    slow = asyncio.ensure_future(b64(gateway, "slow", n=4))
    await eventually(lambda: fake.calls["image"] >= 4, 5)
    started = asyncio.get_running_loop().time()
    submit = await post(gateway, "/v1/chat/completions", CHAT)
    assert submit.code == 200
    assert asyncio.get_running_loop().time() - started < 1
    assert (await slow).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_only_http_urls_reach_clients(gateways, fake, fake_url):
    gateway = gateways("--chat_wait=true")
    await gateway.started()
    picture = fake_url + "/images/%s_0.png" % fake.add_task("a picture")
    fake.result_urls["links"] = ["javascript:alert(1)", "JAVASCRIPT:alert(2)", "file:///etc/passwd", picture]
    chat = body_of(await post(gateway, "/v1/chat/completions", {**CHAT, "prompt": "links"}))
    content = chat["choices"][0]["message"]["content"]
    assert "javascript:" not in content.lower() and "file:" not in content
    assert content.count("](%s/v1/images/" % gateway.url) == 1  # one picture, at the gateway's own link
    poll = body_of(await gateway.fetch("/v1/images/" + chat["choices"][0]["message"]["task_uuid"]))
    assert poll["source_urls"] == [picture] and len(poll["image_urls"]) == 1
    playground = (await gateway.fetch("/playground")).body.decode()
    assert "const isHttp = (url) => /^https?:\\/\\//i.test(url);" in playground and ".filter(isHttp)" in playground


@pytest.mark.gen_test(timeout=30)
async def test_a_submit_reaches_the_upstream_once_when_its_connection_dies(gateways, fake):
    gateway = gateways()
    await gateway.started()
    assert (await post(gateway, "/v1/chat/completions", CHAT)).code == 200  # a kept-alive connection now
    fake.inject("generate", "reset")  # read the submit, then hang up without answering
    response = await post(gateway, "/v1/chat/completions", CHAT)
    assert response.code == 504 and body_of(response)["error"]["code"] == "upstream_outcome_unknown"
    assert "may have been created" in body_of(response)["error"]["message"]
    await asyncio.sleep(0.3)
    assert fake.calls["generate"] == 2  # not 3: libcurl did not send it again


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.gen_test(timeout=30)
async def test_log_lines_cannot_be_forged(gateways, fake, log_format):
    gateway = gateways("--trusted_proxies=127.0.0.1", "--log_format=%s" % log_format)
    await gateway.started()
    fake.outcome = "fail"
    fake.error_message = "no\nFORGED line\u2028FORGED too\x85FORGED three"
    task_uuid = body_of(await post(gateway, "/v1/chat/completions", CHAT))["choices"][0]["message"]["content"]
    assert (await gateway.fetch("/v1/images/" + task_uuid)).code == 502
    await exchange(gateway.url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: evil\x85FORGED\r\n"
                                b"X-Real-IP: not an ip\r\nConnection: close\r\n\r\n")
    assert await gateway.stopped() == 0
    log = gateway.log()
    assert "FORGED line" in log  # it was logged, escaped
    for line in re.split("\n|\u2028|\u0085", log):
        assert not line.startswith("FORGED"), line
    assert "evil" not in log and "not an ip" not in log  # forwarded values that are not addresses


@pytest.mark.gen_test(timeout=30)
async def test_credentials_and_query_strings_are_never_shown(gateways, fake, fake_url):
    upstream = fake_url.replace("http://", "http://user:hunter2@")
    gateway = gateways("--upstream_url=%s" % upstream)
    await gateway.started()
    info, ready = await gateway.fetch("/"), await gateway.fetch("/health/ready")
    assert b"hunter2" not in info.body and fake_url.encode() not in info.body  # visitors: no upstream at all
    assert b"hunter2" not in ready.body and fake_url.encode() in ready.body  # operators: without credentials
    await gateway.fetch("/v1/models?api_key=sk-pasted-secret")
    assert await gateway.stopped() == 0
    log = gateway.log()
    assert "hunter2" not in log and "sk-pasted-secret" not in log
    assert "GET /v1/models" in log


@pytest.mark.gen_test(timeout=30)
async def test_a_picture_is_served_from_the_gateway_under_the_same_rules(gateways, fake, fake_url, elsewhere,
                                                                         tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.alice]\nkey = "sk-alice"\n[keys.bob]\nkey = "sk-bob"\n')
    gateway = gateways("--api_keys_file=%s" % keys)
    await gateway.started()
    alice, bob = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-bob"}
    submitted = await post(gateway, "/v1/chat/completions", {**CHAT, "batch_size": 2}, **alice)
    task_uuid = body_of(submitted)["choices"][0]["message"]["content"]
    assert (await gateway.fetch("/v1/images/%s/1" % task_uuid, headers=alice)).code == 404  # not finished yet
    assert (await gateway.fetch("/v1/images/%s" % task_uuid, headers=alice)).code == 200
    picture = await gateway.fetch("/v1/images/%s/1" % task_uuid, headers=alice)
    assert picture.code == 200 and picture.body.startswith(b"\x89PNG")
    assert picture.headers["Content-Type"] == "image/png"
    assert picture.headers["Content-Disposition"] == 'attachment; filename="%s_1.png"' % task_uuid
    assert (await gateway.fetch("/v1/images/%s/1" % task_uuid, headers=bob)).code == 404  # another key's
    assert (await gateway.fetch("/v1/images/%s/2" % task_uuid, headers=alice)).code == 404
    internal = elsewhere.url + "/images/%s_0.png" % elsewhere.add_task("secret")
    fake.result_urls["steered"] = [internal]
    steered = await post(gateway, "/v1/chat/completions", {**CHAT, "prompt": "steered"}, **alice)
    steered_uuid = body_of(steered)["choices"][0]["message"]["content"]
    assert (await gateway.fetch("/v1/images/%s" % steered_uuid, headers=alice)).code == 200
    refused = await gateway.fetch("/v1/images/%s/0" % steered_uuid, headers=alice)
    assert refused.code == 502 and "non-public address" in body_of(refused)["error"]["message"]
    assert elsewhere.calls["image"] == 0
