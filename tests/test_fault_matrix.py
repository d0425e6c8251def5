"""Every upstream failure the fake can produce, against every endpoint: the documented status and
envelope, a healthy proxy afterwards, and nothing left behind in the engine.

MATRIX is the table in the README ("Fault matrix"); tests/test_readme.py keeps the two equal."""

import asyncio
import json
import socket

import pytest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.testing import bind_unused_port

from helpers import eventually

ENDPOINTS = ["submit", "task", "long-poll", "images.generate", "stream"]
# fault: (how it is played, the fake's fault switch, the cell of each column). How: the whole
# upstream ("refused": nothing listens on its port; "blackhole": a listener whose accept queue
# is full), or the fake's switch on the generate call (submit) or on every status read (others).
ROWS = {
    "connection refused": ("refused", None, ["502", "502", "502", "502", "502"]),
    "connect timeout": ("blackhole", None, ["504", "504", "504", "504", "504"]),
    "read timeout": ("fake", "hang", ["504", "504", "504", "504", "event upstream_unavailable"]),
    "reset mid-response": ("fake", "reset", ["504", "502", "502", "502", "event upstream_unavailable"]),
    "HTTP 500": ("fake", "500", ["502", "502", "502", "502", "event upstream_unavailable"]),
    "HTTP 502": ("fake", "502", ["504", "502", "502", "502", "event upstream_unavailable"]),
    "HTTP 503": ("fake", "503", ["504", "502", "502", "502", "event upstream_unavailable"]),
    "HTTP 429 + Retry-After": ("fake", "429", ["429", "429", "502", "502", "event upstream_unavailable"]),
    "non-JSON body": ("fake", "garbage", ["504", "502", "502", "502", "event upstream_unavailable"]),
    "JSON without the expected fields": ("fake", "no_uuid", ["504", "502", "502", "502",
                                                             "event upstream_unavailable"]),
    "success: false with 200": ("fake", "false200", ["502", "502", "502", "502", "event upstream_unavailable"]),
    "unknown taskStatus": ("fake", "unknown_status", ["200", "200", "504", "504", "event timeout"]),
    "task never finishes": ("fake", None, ["200", "200", "504", "504", "event timeout"]),
}
MATRIX = {fault: cells for fault, (_, _, cells) in ROWS.items()}
CHAT = {"model": "zimage-turbo", "prompt": "a lighthouse"}
# What each column sends; "{task}" is a task made before the fault.
REQUESTS = {
    "submit": ("/v1/chat/completions", "POST", CHAT),
    "task": ("/v1/tasks/{task}", "GET", None),
    "long-poll": ("/v1/images/{task}", "GET", None),
    "images.generate": ("/v1/images/generations", "POST", {"prompt": "a lighthouse"}),
    "stream": ("/v1/chat/completions", "POST", {**CHAT, "stream": True, "wait": True}),
}


class Blackhole:
    """A loopback port whose accept queue is full: connecting to it times out until close()."""

    def __init__(self, port: int) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen(0)
        self.fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(self.server.getsockname())
            except BlockingIOError:
                pass
            self.fillers.append(filler)

    def close(self) -> None:
        for s in self.fillers + [self.server]:
            s.close()


@pytest.fixture
def upstream_port():
    """A free port for an upstream that is not there yet (connection refused)."""
    sock, port = bind_unused_port()
    sock.close()
    return port


def outcome(response):
    """The cell a response shows in the matrix."""
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.body.decode().splitlines() if line.startswith("data: {")]
        errors = [json.loads(e)["error"] for e in events if "error" in json.loads(e)]
        return "event %s" % errors[0]["code"] if errors else "200 stream"
    return str(response.code)


async def settle(proxy):
    """No waiter and no request left; a loop only for a task the gateway follows until it ends (its
    record must learn the end; follow_budget bounds it)."""
    gateway, watcher = proxy.gateway, proxy.gateway.watcher
    await eventually(lambda: not watcher.waiting and watcher.active_polls == watcher.followed and not gateway.active,
                     timeout=3, interval=0.02,
                     message=lambda: "the engine kept state: %d waiters, %d loops (%d followed), %d requests" % (
                         watcher.waiting, watcher.active_polls, watcher.followed, len(gateway.active)))


@pytest.mark.parametrize("column", range(len(ENDPOINTS)), ids=ENDPOINTS)
@pytest.mark.parametrize("fault", list(MATRIX))
@pytest.mark.gen_test(timeout=20)
async def test_fault_matrix(make_proxy, fake, fake_url, upstream_port, fault, column):
    endpoint = ENDPOINTS[column]
    whole, fake_fault, _ = ROWS[fault]
    blackhole = Blackhole(upstream_port) if whole == "blackhole" else None
    upstream = fake_url if whole == "fake" else "http://127.0.0.1:%d" % upstream_port
    proxy = make_proxy(upstream_url=upstream, poll_interval=0.02, max_attempts=20, upstream_timeout=0.2,
                       upstream_connect_timeout=0.1)
    fake.hang_seconds = 1.0
    if fault == "task never finishes":
        fake.outcome = "never"
    task_uuid = fake.add_task("made before the fault")
    if fake_fault:
        fake.inject("generate", fake_fault) if endpoint == "submit" else fake.always("task", fake_fault)

    path, method, body = REQUESTS[endpoint]
    response = await proxy.request(path.format(task=task_uuid), method, body)

    assert outcome(response) == MATRIX[fault][column], response.body
    if response.code >= 400:
        body = json.loads(response.body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        if endpoint == "submit" and response.code == 504 and whole == "fake":  # in doubt: the SDK must not pay twice
            assert body["error"]["code"] == "upstream_outcome_unknown"
            assert response.headers["x-should-retry"] == "false"
        assert "Traceback" not in response.body.decode()
        if fault == "HTTP 429 + Retry-After" and response.code == 429:
            assert response.headers["Retry-After"] == "1"
        if endpoint in ("images.generate", "stream") and response.code >= 500 and whole == "fake":
            assert response.headers["x-should-retry"] == "false"  # the task exists: do not pay twice

    # healthy afterwards, once the upstream is back, and nothing left behind
    await settle(proxy)
    if fake_fault == "429":
        await asyncio.sleep(1.1)  # it asked every read to wait its Retry-After (1 s), and they do
    fake.always("task", None)
    fake.outcome = "complete"
    if blackhole is not None:
        blackhole.close()
    if whole != "fake":  # the upstream comes back where the gateway looks for it
        server = HTTPServer(fake.make_app())
        server.add_sockets(bind_sockets(upstream_port, "127.0.0.1"))
    assert (await proxy.request("/health")).code == 200
    normal = await proxy.submit()
    code, body = await proxy.json("/v1/images/%s" % normal)
    assert code == 200 and body["image_urls"]
    await settle(proxy)
    if whole != "fake":
        server.stop()
