"""GET /v1/images/<uuid>: the long-poll, as curl and scripts use it."""

import json
import time

import pytest
from tornado.iostream import IOStream

from helpers import connect


@pytest.mark.gen_test
async def test_waits_until_completed_and_returns_every_image_url(proxy, fake):
    fake.reads_to_complete = 3
    task_uuid = await proxy.submit(batch_size=3, width=512, height=768)
    code, body = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 200
    assert body["uuid"] == task_uuid
    assert body["status"] == "completed"
    assert len(body["image_urls"]) == 3
    assert body["task_info"]["taskStatus"] == "completed"
    assert fake.task_reads[task_uuid] == 3  # pending, processing, completed
    image = await proxy.http.fetch(body["image_urls"][2])
    assert image.body.startswith(b"\x89PNG")


@pytest.mark.gen_test
async def test_raw_http_client_waits_on_one_connection(proxy, fake):
    """What `curl http://host/v1/images/<uuid>` does: one request, one answer when ready."""
    fake.reads_to_complete = 4
    task_uuid = await proxy.submit()
    stream: IOStream = await connect(proxy.url)
    await stream.write(b"GET /v1/images/%s HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n"
                       b"Accept: */*\r\nConnection: close\r\n\r\n" % task_uuid.encode())
    raw = await stream.read_until_close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["image_urls"]


@pytest.mark.parametrize("style", ["list", "single", "json_string"])
@pytest.mark.gen_test
async def test_every_result_url_shape_becomes_a_list(make_proxy, fake, style):
    fake.result_style = style
    proxy = make_proxy()
    task_uuid = await proxy.submit(batch_size=2)
    code, body = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 200
    expected = 1 if style == "single" else 2
    assert len(body["image_urls"]) == expected
    assert all(url.startswith("http://127.0.0.1:") and url.endswith(".png") for url in body["image_urls"])


@pytest.mark.gen_test
async def test_first_check_is_immediate(make_proxy, fake):
    fake.reads_to_complete = 1
    proxy = make_proxy(poll_interval=3.0)
    task_uuid = await proxy.submit()
    started = time.monotonic()
    code, _ = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 200
    assert time.monotonic() - started < 1.5  # not after the first 3 s interval


@pytest.mark.gen_test
async def test_failed_task_is_502_with_the_upstream_reason(proxy, fake):
    fake.outcome = "fail"
    task_uuid = await proxy.submit()
    code, body = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 502
    assert body["status"] == "failed"
    assert body["uuid"] == task_uuid
    assert body["reason"] == "The model could not draw this prompt"
    assert body["error"]["code"] == "task_failed"


async def wait_on_a_task_that_never_finishes(make_proxy, fake, query="", **settings):
    """(status, body, seconds waited, task uuid) of a long-poll on a task that never finishes."""
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=0.05, **settings)
    task_uuid = await proxy.submit()
    started = time.monotonic()
    code, body = await proxy.json("/v1/images/%s%s" % (task_uuid, query))
    return code, body, time.monotonic() - started, task_uuid


@pytest.mark.gen_test
async def test_budget_spent_is_504_with_last_status_and_progress(make_proxy, fake):
    code, body, waited, task_uuid = await wait_on_a_task_that_never_finishes(make_proxy, fake, max_attempts=4)
    assert code == 504
    assert body["status"] == "timeout"
    assert body["last_status"] == "processing"
    assert isinstance(body["progress"], int)
    assert body["error"]["code"] == "timeout"
    assert 0.15 <= waited < 2
    assert 4 <= fake.task_reads[task_uuid] <= 5  # checked at once, then every interval


@pytest.mark.gen_test
async def test_unknown_task_is_404_at_once(make_proxy, fake):
    proxy = make_proxy(poll_interval=2.0)
    started = time.monotonic()
    code, body = await proxy.json("/v1/images/00000000-0000-4000-8000-00000000dead")
    assert code == 404
    assert body["error"]["code"] == "task_not_found"
    assert time.monotonic() - started < 1
    assert fake.task_reads["00000000-0000-4000-8000-00000000dead"] == 1


@pytest.mark.parametrize("path", ["bad.id", "%2E%2E", "a%2Fb", "x" * 65, "%C3%A9t%C3%A9", "a%20b", "not-a-uuid",
                                  "00000000-0000-4000-8000-00000000000g"])
@pytest.mark.gen_test
async def test_malformed_task_ids_are_400_and_never_reach_the_upstream(proxy, fake, path):
    for prefix in ("/v1/images/", "/v1/tasks/"):
        code, body = await proxy.json(prefix + path)
        assert code == 400
        assert body["error"]["param"] == "uuid"
    assert sum(fake.calls.values()) == 0


@pytest.mark.gen_test
async def test_wait_false_answers_at_once_with_202(make_proxy, fake):
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=2.0)
    task_uuid = await proxy.submit()
    response = await proxy.request("/v1/images/%s?wait=false" % task_uuid)
    body = json.loads(response.body)
    assert response.code == 202
    assert body["status"] in ("pending", "processing")
    assert response.headers["Retry-After"] == "2"


@pytest.mark.gen_test
async def test_timeout_query_caps_the_wait(make_proxy, fake):
    code, _, waited, _ = await wait_on_a_task_that_never_finishes(make_proxy, fake, "?timeout=0.3", max_attempts=1000)
    assert code == 504
    assert 0.25 <= waited < 2


@pytest.mark.gen_test
async def test_bad_wait_parameters_are_400(proxy, fake):
    for query in ("timeout=soon", "timeout=-1", "wait=perhaps"):
        code, body = await proxy.json("/v1/images/abc?%s" % query)
        assert code == 400
    assert sum(fake.calls.values()) == 0
