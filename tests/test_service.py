"""Health, service info, unknown routes and wrong methods."""

import json

import pytest

from zimage_tornado import __version__


@pytest.mark.gen_test
async def test_health_is_cheap_and_never_touches_the_upstream(proxy, fake):
    code, body = await proxy.json("/health")
    assert code == 200
    assert body["status"] == "ok"
    assert body["service"] == "zimage-tornado"
    assert body["version"] == __version__
    assert body["timestamp"].endswith("Z")
    assert sum(fake.calls.values()) == 0


@pytest.mark.gen_test
async def test_info_lists_endpoints_and_not_the_upstream(proxy, fake_url):
    code, body = await proxy.json("/")
    assert code == 200
    assert "upstream" not in body and fake_url not in json.dumps(body)  # visitors need not know it
    paths = {e["path"] for e in body["endpoints"]}
    assert {"/v1/chat/completions", "/v1/tasks/{uuid}", "/v1/images/{uuid}", "/health"} <= paths


@pytest.mark.gen_test
async def test_unknown_route_is_a_404_envelope(proxy):
    code, body = await proxy.json("/v2/nothing")
    assert code == 404
    assert body["error"]["type"] == "invalid_request_error"
    assert "/v2/nothing" in body["error"]["message"]


@pytest.mark.gen_test
async def test_wrong_method_is_a_405_envelope(proxy, fake):
    code, body = await proxy.json("/v1/chat/completions")
    assert code == 405
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "GET" in body["error"]["message"]
    code, body = await proxy.json("/health", "DELETE")
    assert code == 405
    assert sum(fake.calls.values()) == 0
