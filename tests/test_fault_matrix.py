"""Every upstream failure the fake can produce, against every endpoint: the documented status and
envelope, a healthy proxy afterwards, and nothing left behind in the engine.

MATRIX is the table in the README ("Fault matrix"); tests/test_readme.py keeps the two equal."""

import asyncio
import json
import socket
import time

import pytest

ENDPOINTS = ["submit", "task", "long-poll", "images.generate", "stream"]
# submit: POST /v1/chat/completions, the fault on the generate call.
# task: GET /v1/tasks/{uuid}; long-poll: GET /v1/images/{uuid}; images.generate and stream
# (chat with stream and wait): the fault on every status read after a successful submit.
# "connection refused" and "connect timeout" are the whole upstream: every call fails.
MATRIX = {
    "connection refused": ["502", "502", "502", "502", "502"],
    "connect timeout": ["504", "504", "504", "504", "504"],
    "read timeout": ["504", "504", "504", "504", "event upstream_unavailable"],
    "reset mid-response": ["502", "502", "502", "502", "event upstream_unavailable"],
    "HTTP 500": ["502", "502", "502", "502", "event upstream_unavailable"],
    "HTTP 502": ["502", "502", "502", "502", "event upstream_unavailable"],
    "HTTP 503": ["502", "502", "502", "502", "event upstream_unavailable"],
    "HTTP 429 + Retry-After": ["429", "429", "502", "502", "event upstream_unavailable"],
    "non-JSON body": ["502", "502", "502", "502", "event upstream_unavailable"],
    "JSON without the expected fields": ["502", "502", "502", "502", "event upstream_unavailable"],
    "success: false with 200": ["502", "502", "502", "502", "event upstream_unavailable"],
    "unknown taskStatus": ["200", "200", "504", "504", "event timeout"],
    "task never finishes": ["200", "200", "504", "504", "event timeout"],
}
FAKE_FAULT = {"read timeout": "hang", "reset mid-response": "reset", "HTTP 500": "500", "HTTP 502": "502",
              "HTTP 503": "503", "HTTP 429 + Retry-After": "429", "non-JSON body": "garbage",
              "JSON without the expected fields": "no_uuid", "success: false with 200": "false200",
              "unknown taskStatus": "unknown_status"}
CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}


@pytest.fixture
def blackhole():
    """A loopback port whose accept queue is full: connecting to it times out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(server.getsockname())
        except BlockingIOError:
            pass
        fillers.append(filler)
    yield "http://127.0.0.1:%d" % server.getsockname()[1]
    for s in fillers + [server]:
        s.close()


def outcome(response):
    """The cell a response shows in the matrix."""
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.body.decode().splitlines() if line.startswith("data: {")]
        errors = [json.loads(e)["error"] for e in events if "error" in json.loads(e)]
        return "event %s" % errors[0]["code"] if errors else "200 stream"
    return str(response.code)


async def settle(proxy):
    watcher, deadline = proxy.gateway.watcher, time.monotonic() + 3
    while watcher.waiting or watcher.active_polls or watcher._reads or proxy.gateway.active:
        assert time.monotonic() < deadline, "the engine kept state: %d waiters, %d loops, %d reads, %d requests" % (
            watcher.waiting, watcher.active_polls, len(watcher._reads), len(proxy.gateway.active))
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("column", range(len(ENDPOINTS)), ids=ENDPOINTS)
@pytest.mark.parametrize("fault", list(MATRIX))
@pytest.mark.gen_test(timeout=20)
async def test_fault_matrix(make_proxy, fake, fake_url, blackhole, fault, column):
    endpoint = ENDPOINTS[column]
    upstream = {"connection refused": "http://127.0.0.1:9", "connect timeout": blackhole}.get(fault, fake_url)
    proxy = make_proxy(upstream_url=upstream, poll_interval=0.02, max_attempts=20, upstream_timeout=0.2,
                       upstream_connect_timeout=0.1)
    fake.hang_seconds = 1.0
    if fault == "task never finishes":
        fake.outcome = "never"
    task_uuid = fake.add_task("made before the fault")
    if endpoint == "submit" and fault in FAKE_FAULT:
        fake.inject("generate", FAKE_FAULT[fault])
    elif fault in FAKE_FAULT:
        fake.always("task", FAKE_FAULT[fault])

    if endpoint == "submit":
        response = await proxy.request("/v1/chat/completions", "POST", CHAT)
    elif endpoint == "task":
        response = await proxy.request("/v1/tasks/%s" % task_uuid)
    elif endpoint == "long-poll":
        response = await proxy.request("/v1/images/%s" % task_uuid)
    elif endpoint == "images.generate":
        response = await proxy.request("/v1/images/generations", "POST", {"prompt": "a lighthouse"})
    else:
        response = await proxy.request("/v1/chat/completions", "POST", {**CHAT, "stream": True, "wait": True})

    assert outcome(response) == MATRIX[fault][column], response.body
    if response.code >= 400:
        body = json.loads(response.body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in response.body.decode()
        if fault == "HTTP 429 + Retry-After" and response.code == 429:
            assert response.headers["Retry-After"] == "1"
        if endpoint in ("images.generate", "stream") and response.code >= 500 and upstream == fake_url:
            assert response.headers["x-should-retry"] == "false"  # the task exists: do not pay twice

    # healthy afterwards, and nothing left behind
    await settle(proxy)
    fake.always("task", None)
    fake.outcome = "complete"
    proxy.gateway.upstream.base_url = fake_url
    assert (await proxy.request("/health")).code == 200
    normal = await proxy.submit()
    code, body = await proxy.json("/v1/images/%s" % normal)
    assert code == 200 and body["image_urls"]
    await settle(proxy)
