"""Property-based fuzzing with hypothesis: whatever a client sends, the gateway answers 2xx or
4xx with a well-formed envelope, never a 5xx of its own, and a rejected request never reaches the
upstream (the fake counts every call).

Hypothesis drives a synchronous client, so the fake and the proxy run on their own IOLoop in a
background thread; the bytes still cross real loopback sockets."""

import asyncio
import http.client
import json
import threading
from urllib.parse import quote

import pytest
from conftest import serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zimage_tornado.app import make_app
from zimage_tornado.config import Settings
from zimage_tornado.fake_upstream import FakeZImage

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = ["model", "messages", "prompt", "negative_prompt", "batch_size", "width", "height", "steps", "cfg_scale",
        "extra_body", "stream", "wait", "n", "size", "response_format", "role", "content"]


@pytest.fixture(scope="module")
def live():
    fake = FakeZImage(reads_to_complete=1)
    ready, state = threading.Event(), {}

    async def main():
        fake_server, fake_port = serve(fake.make_app())
        # follow_budget=0: tasks the other fuzz tests submit are not followed in the background,
        # whose status reads would land in the middle of a check that a reject read nothing; and a
        # database of its own (the default file in the working directory outlives the run, and its
        # unfinished tasks were followed again at the next start)
        app = make_app(Settings(upstream_url="http://127.0.0.1:%d" % fake_port, poll_interval=0.01,
                                max_attempts=50, upstream_timeout=5, follow_budget=0, database=":memory:"))
        server, port = serve(app)
        state.update(port=port, loop=asyncio.get_running_loop(), stop=asyncio.Event())
        ready.set()
        await state["stop"].wait()
        server.stop()
        fake_server.stop()
        await app.gateway.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield fake, state["port"]
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(10)


def request(port, method, path, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def assert_well_formed(status, content_type, raw):
    assert status < 500, raw[:500]
    if status >= 400:
        body = json.loads(raw)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif content_type.startswith("application/json"):
        json.loads(raw)


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**40, max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", " ", "zimage-turbo", "1024x1024", "b64_json", "user", "4", "\u0000", "\ud800"]),
)
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=10)
plausible = st.fixed_dictionaries(
    {"model": st.sampled_from(["zimage-turbo", "zimage-base", "dall-e-3"]), "prompt": st.text(min_size=1, max_size=30)},
    optional={k: values | st.integers(0, 3000) for k in ("batch_size", "width", "height", "steps", "cfg_scale", "n",
                                                          "size", "wait", "stream", "negative_prompt")})
bodies = st.one_of(
    values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=8).map(lambda v: json.dumps(v).encode()),
    plausible.map(lambda v: json.dumps(v).encode()),
    # duplicate keys: the JSON text itself, as json.dumps never writes them
    st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=6).map(
        lambda pairs: ("{%s}" % ",".join("%s:%s" % (json.dumps(k), json.dumps(v)) for k, v in pairs)).encode()),
    st.binary(max_size=200),
    # huge strings: a short random text repeated past max_prompt_length
    st.tuples(st.text(min_size=1, max_size=20), st.integers(500, 5000)).map(
        lambda tr: json.dumps({"model": "zimage-turbo", "prompt": tr[0] * tr[1]}).encode()),
)


@FUZZ
@given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/images/generations"]))
def test_random_bodies_never_crash_and_rejects_never_reach_the_upstream(live, body, path):
    fake, port = live
    before = fake.calls["generate"]
    status, content_type, raw = request(port, "POST", path, body)
    assert_well_formed(status, content_type, raw)
    if 400 <= status < 500:
        assert fake.calls["generate"] == before, raw


segments = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["..", ".", "%2F", "%2f", "/", "?", "#", "%", "%00", "a", "-", "é", "\u202e", "x" * 70,
                              "%2E%2E", "%E9", "uuid-1234"]), max_size=6).map("".join),
)


@FUZZ
@given(segment=segments, prefix=st.sampled_from(["/v1/images/", "/v1/tasks/"]),
       safe=st.sampled_from(["", "/", "/%", "/%?#.", "%"]))
def test_random_task_paths_never_crash_and_rejects_never_reach_the_upstream(live, segment, prefix, safe):
    fake, port = live
    before = fake.calls["task"]
    path = prefix + quote(segment, safe=safe)
    status, content_type, raw = request(port, "GET", path + ("&" if "?" in path else "?") + "wait=false")
    assert_well_formed(status, content_type, raw)
    if status == 400:
        assert fake.calls["task"] == before, (path, raw)
