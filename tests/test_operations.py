"""What operators need, in-process: readiness, metrics, API keys, limits, request ids, CORS."""

import asyncio
import json
import logging
import time

import openai
import pytest
from tornado.iostream import StreamClosedError

from helpers import connect
from zimage_tornado import logs


@pytest.mark.gen_test
async def test_readiness_reports_the_upstream_without_polling_it(proxy, fake):
    code, body = await proxy.json("/health/ready")
    assert code == 200 and body["status"] == "ready"
    assert body["upstream"]["answered_recently"] is False
    assert sum(fake.calls.values()) == 0  # asking did not call it
    await proxy.submit()
    code, body = await proxy.json("/health/ready")
    assert body["upstream"]["answered_recently"] is True
    assert body["upstream"]["last_answer_seconds_ago"] < 5


@pytest.mark.gen_test
async def test_readiness_names_the_last_upstream_failure(make_proxy):
    proxy = make_proxy(upstream_url="http://127.0.0.1:9")
    await proxy.json("/v1/chat/completions", "POST", {"model": "zimage-turbo", "prompt": "x"})
    code, body = await proxy.json("/health/ready")
    assert code == 200
    assert body["upstream"]["last_failure"]["error"] == "The upstream could not be reached"


@pytest.mark.gen_test
async def test_while_shutting_down_ready_is_503_and_new_work_is_refused(proxy, fake):
    proxy.gateway.shutting_down = True
    code, body = await proxy.json("/health/ready")
    assert code == 503 and body["status"] == "shutting_down"
    response = await proxy.request("/v1/chat/completions", "POST", {"model": "zimage-turbo", "prompt": "x"})
    assert response.code == 503 and response.headers["Retry-After"]
    assert json.loads(response.body)["error"]["code"] == "shutting_down"
    assert (await proxy.json("/health"))[0] == 200
    assert fake.calls["generate"] == 0


@pytest.mark.gen_test(timeout=10)
async def test_metrics_count_requests_upstream_calls_and_the_engine(proxy, fake):
    task_uuid = await proxy.submit()
    await asyncio.gather(*(proxy.json("/v1/images/%s" % task_uuid) for _ in range(3)))
    await proxy.json("/v1/images/%s" % task_uuid)  # from the cache
    await proxy.json("/v1/chat/completions", "POST", {"model": "zimage-turbo"})  # a 400
    response = await proxy.request("/metrics")
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/plain")
    text = response.body.decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['zimage_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'] == 1
    assert samples['zimage_http_requests_total{method="POST",route="/v1/chat/completions",status="400"}'] == 1
    assert samples['zimage_http_requests_total{method="GET",route="/v1/images/{uuid}",status="200"}'] == 4
    assert samples['zimage_upstream_calls_total{kind="submit",outcome="ok"}'] == 1
    assert samples['zimage_upstream_calls_total{kind="task",outcome="ok"}'] == fake.task_reads[task_uuid]
    assert samples['zimage_http_request_duration_seconds_count{route="/v1/images/{uuid}"}'] == 4
    assert samples["zimage_coalesced_waiters_total"] == 3  # each joined the loop that follows the task
    assert samples["zimage_cache_hits_total"] >= 1
    assert samples["zimage_waiters"] == 0 and samples["zimage_polling_loops"] == 0


@pytest.mark.gen_test(timeout=10)
async def test_metrics_show_current_waiters(make_proxy, fake):
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=0.05, max_attempts=1000)
    task_uuid = await proxy.submit()
    waiting = asyncio.ensure_future(proxy.json("/v1/images/%s?timeout=1" % task_uuid))
    await asyncio.sleep(0.3)
    text = (await proxy.request("/metrics")).body.decode()
    assert "zimage_waiters 1.0" in text and "zimage_polling_loops 1.0" in text
    await waiting


@pytest.mark.gen_test
async def test_api_keys_guard_v1_only(make_proxy, fake, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key\n\n")
    proxy = make_proxy(api_keys="k1, k2", api_keys_file=str(keys))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}):
        response = await proxy.request("/v1/models", headers=headers)
        assert response.code == 401
        assert json.loads(response.body)["error"]["code"] == "invalid_api_key"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for key in ("k1", "k2", "file-key"):
        assert (await proxy.request("/v1/models", headers={"Authorization": "Bearer " + key})).code == 200
    code, _ = await proxy.json("/v1/chat/completions", "POST", {"model": "zimage-turbo", "prompt": "x"})
    assert code == 401 and fake.calls["generate"] == 0
    assert (await proxy.request("/health")).code == 200
    assert (await proxy.request("/metrics")).code == 401  # with keys, for admins only (or metrics_public)


@pytest.mark.gen_test(timeout=10)
async def test_sdk_with_a_wrong_key_gets_authentication_error(make_proxy, io_loop):
    proxy = make_proxy(api_keys="right")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        await io_loop.run_in_executor(None, lambda: client.models.list())
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="right")
    assert await io_loop.run_in_executor(None, lambda: len(client.models.list().data)) == 2


@pytest.mark.gen_test
async def test_with_keys_metrics_need_an_admin_key_unless_public(make_proxy, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.ops]\nkey = "sk-ops"\nadmin = true\n[keys.user]\nkey = "sk-user"\n')
    proxy = make_proxy(api_keys_file=str(keys))
    assert (await proxy.request("/metrics")).code == 401  # it names every key and its use
    assert (await proxy.request("/metrics", headers={"Authorization": "Bearer sk-user"})).code == 403
    assert (await proxy.request("/metrics", headers={"Authorization": "Bearer sk-ops"})).code == 200
    assert (await make_proxy(api_keys_file=str(keys), metrics_public=True).request("/metrics")).code == 200
    assert (await make_proxy().request("/metrics")).code == 200  # no keys: nobody to hide from


@pytest.mark.gen_test
async def test_oversize_body_is_413_and_never_reaches_the_upstream(make_proxy, fake):
    proxy = make_proxy(max_body_bytes=1000)
    body = {"model": "zimage-turbo", "prompt": "x" * 2000}
    response = await proxy.request("/v1/chat/completions", "POST", body)
    assert response.code == 413
    assert json.loads(response.body)["error"]["code"] == "body_too_large"
    assert fake.calls["generate"] == 0
    # a chunked body, whose size is only known while reading it
    stream = await connect(proxy.url)
    payload = json.dumps(body).encode()
    await stream.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                       b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
    raw = await stream.read_until_close()
    assert raw.startswith(b"HTTP/1.1 413") and b"body_too_large" in raw
    # a Content-Length of thousands of digits is larger than any limit, not an error of the gateway's
    stream = await connect(proxy.url)
    await stream.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n{}" % (b"9" * 5000))
    raw = await stream.read_until_close()
    assert raw.startswith(b"HTTP/1.1 413") and b"body_too_large" in raw
    assert fake.calls["generate"] == 0
    assert (await proxy.json("/v1/chat/completions", "POST", {"model": "zimage-turbo", "prompt": "ok"}))[0] == 200


@pytest.mark.gen_test(timeout=10)
async def test_slow_loris_clients_are_cut_off_while_others_are_served(make_proxy):
    proxy = make_proxy(idle_timeout=0.5, body_timeout=0.5)
    headers_trickle = await connect(proxy.url)
    body_trickle = await connect(proxy.url)
    await body_trickle.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    started = time.monotonic()
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 100
    for i in range(40):
        if headers_trickle.closed() and body_trickle.closed():
            break
        for stream in (headers_trickle, body_trickle):
            if not stream.closed():
                try:
                    await stream.write(request[i:i + 1] if stream is headers_trickle else b"{")
                except StreamClosedError:
                    pass  # cut off, as it should be
        began = time.monotonic()
        assert (await proxy.json("/health"))[0] == 200  # normal clients are still served, fast
        assert time.monotonic() - began < 0.5
        await asyncio.sleep(0.05)
    assert headers_trickle.closed() and body_trickle.closed()
    assert time.monotonic() - started < 1.5


@pytest.mark.gen_test
async def test_request_id_is_kept_returned_logged_and_sent_upstream(proxy, fake, caplog):
    caplog.handler.addFilter(logs.LineFilter())
    with caplog.at_level(logging.DEBUG):  # the upstream call's own lines are at debug
        response = await proxy.request("/v1/chat/completions", "POST", {"model": "zimage-turbo", "prompt": "x"},
                                       headers={"X-Request-ID": "trace-42"})
    assert response.headers["X-Request-ID"] == "trace-42"
    assert fake.request_headers[-1]["X-Request-Id"] == "trace-42"
    tagged = [r for r in caplog.records if getattr(r, "request_id", None) == "trace-42"]
    messages = " | ".join(r.getMessage() for r in tagged)
    assert "submitting task" in messages and "POST /v1/chat/completions" in messages  # forwarding and access
    # absent or unusable: one is made up, and returned
    for headers in ({}, {"X-Request-ID": "bad id with spaces"}):
        response = await proxy.request("/v1/models", headers=headers)
        assert len(response.headers["X-Request-ID"]) == 32
    response = await proxy.request("/v1/nothing", headers={"X-Request-ID": "err-1"})
    assert response.code == 404 and response.headers["X-Request-ID"] == "err-1"


@pytest.mark.gen_test
async def test_cors_for_configured_origins(make_proxy):
    proxy = make_proxy(cors_origins="https://app.example")
    preflight = await proxy.request("/v1/chat/completions", "OPTIONS", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    other = await proxy.request("/v1/models", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    error = await proxy.request("/v1/images/bad.id", headers={"Origin": "https://app.example"})
    assert error.code == 400 and error.headers["Access-Control-Allow-Origin"] == "https://app.example"
    anyone = make_proxy(cors_origins="*")
    response = await anyone.request("/v1/models", headers={"Origin": "https://x.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    plain = make_proxy()
    assert "Access-Control-Allow-Origin" not in (await plain.request("/v1/models", headers={"Origin": "https://app.example"})).headers


@pytest.mark.parametrize("trusted,expected", [("", "127.0.0.1"), ("127.0.0.1", "10.1.2.3"),
                                               ("127.0.0.0/8, 10.0.0.0/8", "203.0.113.7")])
@pytest.mark.gen_test
async def test_forwarded_client_address_only_from_trusted_proxies(make_proxy, caplog, trusted, expected):
    proxy = make_proxy(trusted_proxies=trusted)
    with caplog.at_level(logging.INFO, logger="zimage_tornado.access"):
        await proxy.request("/health", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 10.1.2.3"})
    line = [r.getMessage() for r in caplog.records if r.name == "zimage_tornado.access"][-1]
    assert "(%s)" % expected in line


@pytest.mark.gen_test
async def test_one_access_line_names_a_submit_s_key_and_task(make_proxy, caplog):
    proxy = make_proxy()
    with caplog.at_level(logging.INFO, logger="zimage_tornado"):
        task_uuid = await proxy.submit()
        await proxy.request("/v1/tasks/%s" % task_uuid)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    submits = [line for line in lines if "POST /v1/chat/completions" in line]
    assert len(submits) == 1 and "key=anonymous task=%s " % task_uuid in submits[0]
    assert [line for line in lines if task_uuid in line and "GET /v1/tasks/" in line]
    assert len([line for line in lines if task_uuid in line]) == 2  # one line a request: no other line repeats it


@pytest.mark.gen_test
async def test_a_get_with_a_body_is_refused_rather_than_waited_for(proxy, fake):
    response = await proxy.request("/v1/models", "GET", raw=b'{"x": 1}')
    assert response.code == 400
    assert json.loads(response.body)["error"]["code"] == "unexpected_body"
    assert sum(fake.calls.values()) == 0


@pytest.mark.gen_test
async def test_a_browser_client_may_read_the_rate_limit_headers(make_proxy, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.web]\nkey = "sk-web"\nrequests_per_minute = 5\n')
    proxy = make_proxy(cors_origins="https://app.example", api_keys_file=str(keys))
    answer = await proxy.request("/v1/chat/completions", "POST", {"model": "zimage-turbo", "prompt": "a fox"},
                                 headers={"Origin": "https://app.example", "Authorization": "Bearer sk-web"})
    assert answer.code == 200 and answer.headers["x-ratelimit-remaining-requests"] == "4"
    exposed = {h.strip().lower() for h in answer.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "retry-after"} <= exposed
