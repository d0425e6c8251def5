"""The upstream's API client (upstream_client = pooled, the default): calls share kept-alive
connections, a POST is never sent twice, a connection the upstream closed is not reused, and
an answer cannot grow the gateway's memory."""

from __future__ import annotations

import asyncio
import json

import pytest
from tornado.httpclient import HTTPClientError

from conftest import serve
from zimage_tornado.pooled_http import MAX_BODY_BYTES, PooledHTTPClient
from zimage_tornado.upstream import never_connected

CHAT = {"model": "zimage-turbo", "messages": [{"role": "user", "content": "a lighthouse"}]}


@pytest.mark.gen_test(timeout=10)
async def test_submits_share_one_kept_alive_connection(make_proxy, fake):
    proxy = make_proxy(follow_budget=0)
    for _ in range(5):
        code, body = await proxy.json("/v1/chat/completions", "POST", CHAT)
        assert code == 200, body
    assert fake.calls["generate"] == 5
    assert len(fake.peers) == 1  # one connection for all five calls


@pytest.mark.parametrize("client", ["pooled", "curl"])
@pytest.mark.gen_test(timeout=10)
async def test_a_submit_whose_kept_connection_dies_is_never_sent_again(make_proxy, fake, client):
    proxy = make_proxy(follow_budget=0, upstream_client=client)
    code, _ = await proxy.json("/v1/chat/completions", "POST", CHAT)
    assert code == 200  # the connection is now kept
    fake.inject("generate", "reset")  # the upstream reads the submit, then the connection dies
    code, body = await proxy.json("/v1/chat/completions", "POST", CHAT)
    assert code == 504
    assert body["error"]["code"] == "upstream_outcome_unknown"
    await asyncio.sleep(0.2)
    assert fake.calls["generate"] == 2  # the second submit arrived once: never re-sent on a new connection


@pytest.mark.gen_test(timeout=10)
async def test_a_task_read_whose_kept_connection_dies_is_asked_once_more(make_proxy, fake):
    proxy = make_proxy(follow_budget=0)
    task_uuid = await proxy.submit()
    fake.inject("task", "reset")
    code, body = await proxy.json("/v1/tasks/%s" % task_uuid)
    assert code == 200, body  # a GET is safe to repeat: asked again on a new connection
    assert fake.calls["task"] == 2


@pytest.mark.gen_test(timeout=10)
async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(make_proxy, fake):
    # An upstream that closes idle connections after 0.1 s (gunicorn's default is 2 s, Node's 5 s):
    # sending the next submit down the closed one would end in "outcome unknown".
    server, port = serve(fake.make_app(), idle_connection_timeout=0.1)
    try:
        proxy = make_proxy(upstream_url="http://127.0.0.1:%d" % port, follow_budget=0)
        for _ in range(3):
            code, body = await proxy.json("/v1/chat/completions", "POST", CHAT)
            assert code == 200, body
            await asyncio.sleep(0.3)
        assert len(fake.peers) == 3  # a new connection each time, and every submit answered
    finally:
        server.stop()


@pytest.mark.gen_test(timeout=10)
async def test_a_queued_call_that_times_out_was_never_sent(make_proxy, fake):
    fake.hang_seconds = 1.0
    proxy = make_proxy(upstream_max_clients=1, upstream_timeout=0.4, follow_budget=0)
    fake.inject("generate", "hang")
    first, second = await asyncio.gather(proxy.json("/v1/chat/completions", "POST", CHAT),
                                         proxy.json("/v1/chat/completions", "POST", CHAT))
    codes = sorted([first[1]["error"]["code"], second[1]["error"]["code"]])
    # The one sent may have made a job; the one that waited for a connection certainly did not.
    assert codes == ["upstream_outcome_unknown", "upstream_timeout"]
    await asyncio.sleep(0.8)
    assert fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=10)
async def test_an_answer_larger_than_the_limit_is_refused_not_kept(fake_url, fake):
    client = PooledHTTPClient(force_instance=True, max_clients=2)
    try:
        fake.inject("generate", "huge_answer")
        with pytest.raises(Exception) as refused:
            await client.fetch(fake_url + "/api/z-image/generate", method="POST", body=json.dumps({"prompt": "x"}))
        assert not isinstance(refused.value, HTTPClientError) or refused.value.code == 599
        assert not never_connected(refused.value)  # it was sent: a submit failing this way is in doubt
        assert 9 * 1024 * 1024 > MAX_BODY_BYTES
        # the client goes on working, on a new connection
        response = await client.fetch(fake_url + "/api/z-image/generate", method="POST",
                                      body=json.dumps({"prompt": "x"}))
        assert json.loads(response.body)["success"] is True
    finally:
        client.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_refused_connection_is_known_never_sent():
    client = PooledHTTPClient(force_instance=True, defaults={"connect_timeout": 1, "request_timeout": 2})
    try:
        with pytest.raises(HTTPClientError) as refused:
            await client.fetch("http://127.0.0.1:9/api/z-image/generate", method="POST", body=b"{}")
        assert never_connected(refused.value)
    finally:
        client.close()


@pytest.mark.parametrize("client", ["pooled", "curl"])  # (simple sends the password still percent-encoded)
@pytest.mark.gen_test(timeout=10)
async def test_credentials_in_the_upstream_url_are_sent_as_basic_auth(make_proxy, fake, fake_url, client):
    # upstream_url = http://user:password@host/ (a service behind a proxy that asks for them)
    proxy = make_proxy(upstream_url=fake_url.replace("http://", "http://gw:s%40cret@"), upstream_client=client,
                       follow_budget=0)
    code, body = await proxy.json("/v1/chat/completions", "POST", CHAT)
    assert code == 200, body
    assert fake.request_headers[-1]["Authorization"] == "Basic Z3c6c0BjcmV0"  # gw:s@cret


@pytest.mark.gen_test(timeout=10)
async def test_a_connection_idle_past_its_time_is_closed_not_reused(fake_url, fake):
    client = PooledHTTPClient(force_instance=True, idle_seconds=0.2)
    try:
        for pause in (0, 0.05, 0.4):
            await asyncio.sleep(pause)
            await client.fetch(fake_url + "/api/z-image/generate", method="POST", body=b'{"prompt": "x"}')
        assert len(fake.peers) == 2  # reused after 0.05 s, replaced after 0.4 s
    finally:
        client.close()


@pytest.mark.gen_test(timeout=10)
async def test_a_proxy_the_environment_names_is_used_as_curl_used_it(make_proxy, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens: a call through it fails
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    through = make_proxy(follow_budget=0)
    code, body = await through.json("/v1/chat/completions", "POST", CHAT)
    assert code == 502 and body["error"]["code"] == "upstream_unavailable"  # it went for the proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    direct = make_proxy(follow_budget=0)
    code, body = await direct.json("/v1/chat/completions", "POST", CHAT)
    assert code == 200, body  # a host no_proxy names is called directly
