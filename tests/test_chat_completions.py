"""POST /v1/chat/completions against the fake upstream: translation, errors, status mapping."""

import json

import pytest

SPEC_BODY = {
    "model": "zimage-turbo",
    "messages": [{"role": "user", "content": "一只站在月球上的猫，超现实主义"}],
    "extra_body": {"prompt": "一只站在月球上的猫，超现实主义", "negative_prompt": "模糊,水印",
                   "batch_size": 4, "width": 1360, "height": 1024, "steps": 8, "cfg_scale": 7},
}


def assert_envelope(body, param=None):
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert "Traceback" not in json.dumps(body)
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.gen_test
async def test_spec_request_submits_one_task_and_answers_the_spec_format(proxy, fake):
    code, body = await proxy.json("/v1/chat/completions", "POST", SPEC_BODY,
                                  headers={"Authorization": "Bearer zimage-free"})
    assert code == 200
    task_uuid = body["choices"][0]["message"]["content"]
    assert task_uuid in fake.tasks
    assert body["id"] == "chatcmpl-%s" % task_uuid
    assert body["object"] == "chat.completion"
    assert body["model"] == "zimage-turbo"
    assert isinstance(body["created"], int)
    assert body["choices"][0]["message"]["task_uuid"] == task_uuid
    assert body["choices"][0]["finish_reason"] == "stop"
    assert fake.generate_bodies == [{
        "prompt": "一只站在月球上的猫，超现实主义", "negative_prompt": "模糊,水印", "model": "turbo",
        "batch_size": 4, "width": 1360, "height": 1024, "steps": 8, "cfg_scale": 7}]


@pytest.mark.gen_test
async def test_uuid_found_under_data_task_uuid(make_proxy, fake):
    fake.uuid_at = "task"
    proxy = make_proxy()
    task_uuid = await proxy.submit()
    assert task_uuid in fake.tasks


@pytest.mark.gen_test
async def test_non_turbo_model_asks_for_base(proxy, fake):
    code, _ = await proxy.json("/v1/chat/completions", "POST",
                               {"model": "zimage", "messages": [{"role": "user", "content": "x"}]})
    assert code == 200
    assert fake.generate_bodies[0]["model"] == "base"


@pytest.mark.parametrize("raw,param", [
    (b"{not json", None),
    (b"", None),
    (b"[1,2]", None),
    (b'{"model": "zimage-turbo", "messages": []}', "messages"),
    (b'{"model": "zimage-turbo", "prompt": "x", "batch_size": true}', "batch_size"),
    (b'{"model": "zimage-turbo", "prompt": "x", "extra_body": {"batch_size": "4"}}', "batch_size"),
    (b'{"model": "zimage-turbo", "prompt": "x", "extra_body": {"width": 99999}}', "width"),
    (b'{"model": "zimage-turbo", "prompt": "x", "steps": 500}', "steps"),
    (b'\xff\xfe', None),
])
@pytest.mark.gen_test
async def test_client_errors_are_400_envelopes_and_never_reach_the_upstream(proxy, fake, raw, param):
    response = await proxy.request("/v1/chat/completions", "POST", raw=raw)
    body = json.loads(response.body)
    assert response.code == 400
    assert response.headers["Content-Type"].startswith("application/json")
    assert_envelope(body, param)
    assert fake.calls["generate"] == 0


@pytest.mark.parametrize("client", ["pooled", "curl", "simple"])
@pytest.mark.parametrize("fault,status,code", [
    # definite refusals: the service's own success:false, or a 4xx (may be retried)
    ("400", 400, "upstream_rejected"),
    ("429", 429, "upstream_rejected"),
    ("500", 502, "upstream_rejected"),
    ("false200", 502, "upstream_rejected"),
    # in doubt: the submit arrived and no readable answer came back (never resubmitted)
    ("502", 504, "upstream_outcome_unknown"),
    ("garbage", 504, "upstream_outcome_unknown"),
    ("no_uuid", 504, "upstream_outcome_unknown"),
    ("reset", 504, "upstream_outcome_unknown"),
])
@pytest.mark.gen_test
async def test_upstream_failures_map_to_documented_statuses(make_proxy, fake, fault, status, code, client):
    proxy = make_proxy(upstream_client=client)
    fake.inject("generate", fault)
    response = await proxy.request("/v1/chat/completions", "POST", SPEC_BODY)
    body = json.loads(response.body)
    assert response.code == status
    assert_envelope(body)
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "upstream_error"
    in_doubt = code == "upstream_outcome_unknown"
    assert (response.headers.get("x-should-retry") == "false") == in_doubt  # the OpenAI SDK must not resubmit
    if fault == "429":
        assert response.headers["Retry-After"] == "1"
        assert body["error"]["message"] == "Rate limit exceeded, slow down"
    if fault == "400":
        assert body["error"]["message"] == "Prompt is required and must be a string"


@pytest.mark.parametrize("client", ["pooled", "curl", "simple"])
@pytest.mark.gen_test
async def test_upstream_timeout_is_504(make_proxy, fake, client):
    fake.inject("generate", "hang")
    fake.hang_seconds = 1.0
    proxy = make_proxy(upstream_timeout=0.2, upstream_client=client)
    response = await proxy.request("/v1/chat/completions", "POST", SPEC_BODY)
    body = json.loads(response.body)
    assert response.code == 504
    assert body["error"]["code"] == "upstream_outcome_unknown"  # the job may exist: say so, never resubmit
    assert response.headers["x-should-retry"] == "false"
    assert "may have been created" in body["error"]["message"]


@pytest.mark.parametrize("client", ["pooled", "curl", "simple"])
@pytest.mark.gen_test
async def test_upstream_unreachable_is_502(make_proxy, client):
    # discard port: nothing listens
    proxy = make_proxy(upstream_url="http://127.0.0.1:9", upstream_client=client)
    code, body = await proxy.json("/v1/chat/completions", "POST", SPEC_BODY)
    assert code == 502
    assert body["error"]["code"] == "upstream_unavailable"
    assert "127.0.0.1" not in body["error"]["message"]


@pytest.mark.gen_test
async def test_every_error_is_logged_once_with_method_path_and_uuid(proxy, fake, caplog):
    fake.inject("generate", "500")
    with caplog.at_level("WARNING", logger="zimage_tornado.handlers"):
        await proxy.request("/v1/chat/completions", "POST", SPEC_BODY)
    lines = [r.getMessage() for r in caplog.records if r.name == "zimage_tornado.handlers"]
    assert len(lines) == 1
    assert "POST /v1/chat/completions" in lines[0] and "502" in lines[0]


@pytest.mark.gen_test(timeout=10)
async def test_a_last_user_message_without_text_is_told_plainly(proxy, fake):
    code, body = await proxy.json("/v1/chat/completions", "POST", {
        "model": "zimage-turbo", "messages": [{"role": "user", "content": "a fox"}, {"role": "user", "content": " "}]})
    assert code == 400 and body["error"]["message"] == "The last user message has no text: write what to draw in it"
    assert body["error"]["param"] == "messages" and fake.calls["generate"] == 0
