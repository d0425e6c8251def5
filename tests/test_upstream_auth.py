"""zimage.run behind a browser check (a Cloudflare challenge): a server cannot pass it, so the
gateway says so (502 provider_auth_required), makes no job, spends no quota, and asks the service
again at most once per cooldown; an operator's own session cookie (upstream_cookie_env) gets
through."""

import json
import time

import pytest

from zimage_tornado import upstream
from zimage_tornado.config import Settings

CHAT = {"model": "zimage-turbo", "messages": [{"role": "user", "content": "a lantern"}]}


@pytest.mark.gen_test(timeout=20)
async def test_a_browser_check_is_a_502_naming_it_with_no_job_no_quota_and_no_retry_storm(make_proxy, fake):
    fake.always("generate", "challenge")
    proxy = make_proxy(ip_images_per_day=5)
    code, body = await proxy.json("/v1/chat/completions", "POST", CHAT)
    assert code == 502 and body["error"]["code"] == "provider_auth_required"
    assert "browser check" in body["error"]["message"] and "upstream_cookie_env" in body["error"]["message"]
    assert fake.calls["generate"] == 1 and not fake.tasks
    for _ in range(5):  # within the cooldown: answered at once, the service is not asked again
        response = await proxy.request("/v1/chat/completions", "POST", body=CHAT)
        assert response.code == 502 and int(response.headers["Retry-After"]) > 0
    assert fake.calls["generate"] == 1
    code, ready = await proxy.json("/health/ready")  # a load balancer stops sending submits here
    assert code == 503 and ready["status"] == "upstream_auth_required"
    assert 0 < ready["upstream"]["auth_required_for_seconds"] <= 30
    fake.always("generate", None)
    proxy.gateway.upstream.checked_until = time.monotonic()  # the cooldown ends
    code, body = await proxy.json("/v1/chat/completions", "POST", CHAT)
    assert code == 200 and fake.calls["generate"] == 2
    assert (await proxy.json("/health/ready"))[0] == 200
    assert body["choices"][0]["message"]["content"] in fake.tasks


@pytest.mark.gen_test(timeout=20)
async def test_a_task_read_that_meets_a_browser_check_ends_the_wait_plainly(make_proxy, fake):
    proxy = make_proxy()
    code, body = await proxy.json("/v1/chat/completions", "POST", CHAT)
    uuid = body["choices"][0]["message"]["content"]
    fake.always("task", "challenge")
    code, body = await proxy.json("/v1/images/%s" % uuid)
    assert code == 502 and body["error"]["code"] == "provider_auth_required"


@pytest.mark.gen_test(timeout=20)
async def test_an_operators_session_cookie_gets_through(make_proxy, fake, monkeypatch):
    fake.session_cookie = "zsession=operator-1"
    monkeypatch.setenv("ZIMAGE_TEST_SESSION", "zsession=operator-1")
    proxy = make_proxy(upstream_cookie_env="ZIMAGE_TEST_SESSION")
    code, body = await proxy.json("/v1/chat/completions", "POST", {**CHAT, "extra_body": {"wait": True}})
    assert code == 200 and "![image 1](" in body["choices"][0]["message"]["content"]
    assert fake.request_headers and all(headers.get("Cookie") == "zsession=operator-1"
                                        for headers in fake.request_headers)  # on every API call
    without = make_proxy()  # the same service, no session: the check
    code, body = await without.json("/v1/chat/completions", "POST", CHAT)
    assert code == 502 and body["error"]["code"] == "provider_auth_required"


def test_a_cookie_variable_that_is_not_set_stops_the_start(monkeypatch):
    monkeypatch.delenv("ZIMAGE_NO_SUCH_SESSION", raising=False)
    with pytest.raises(ValueError, match="ZIMAGE_NO_SUCH_SESSION"):
        Settings(upstream_cookie_env="ZIMAGE_NO_SUCH_SESSION")


def test_a_challenge_is_told_from_an_api_error():
    class Answer:
        def __init__(self, code, body, headers=None):
            self.code, self.body, self.headers = code, body, headers or {}
    assert upstream.browser_check(Answer(403, b"<html><title>Just a moment...</title>"))
    assert upstream.browser_check(Answer(200, b"{}", {"cf-mitigated": "challenge"}))
    assert not upstream.browser_check(Answer(403, json.dumps({"success": False, "error": "forbidden"}).encode()))
    assert not upstream.browser_check(Answer(500, b"<html>just a moment</html>"))
