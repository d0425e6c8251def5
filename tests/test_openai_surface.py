"""images.generate, models, idempotency and retries, with the real OpenAI SDK."""

import asyncio
import base64
import struct

import openai
import pytest


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def sdk(proxy, io_loop):
    """Runs a call of the synchronous SDK (what users run) off the IOLoop."""
    def run(call, **client_options):
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="zimage-free", **client_options)
        return io_loop.run_in_executor(None, lambda: call(client))
    return run


@pytest.mark.gen_test(timeout=20)
async def test_images_generate_returns_urls(sdk, proxy, fake):
    result = await sdk(lambda c: c.images.generate(model="zimage-turbo", prompt="a red fox", n=2, size="512x768",
                                                   extra_body={"negative_prompt": "blur", "steps": 9}))
    assert len(result.data) == 2
    sent = fake.generate_bodies[0]
    assert (sent["batch_size"], sent["width"], sent["height"], sent["model"]) == (2, 512, 768, "turbo")
    assert (sent["negative_prompt"], sent["steps"]) == ("blur", 9)
    image = await proxy.http.fetch(result.data[1].url)
    assert png_size(image.body) == (512, 768)


@pytest.mark.gen_test(timeout=20)
async def test_images_generate_b64_json_returns_the_pictures(sdk, fake):
    result = await sdk(lambda c: c.images.generate(model="zimage-turbo", prompt="a blue whale", n=3,
                                                   size="256x256", response_format="b64_json"))
    pictures = [base64.b64decode(item.b64_json) for item in result.data]
    assert [png_size(p) for p in pictures] == [(256, 256)] * 3
    assert len(set(pictures)) == 3  # each image of the batch, in order, not one repeated
    assert fake.calls["image"] == 3


@pytest.mark.parametrize("kwargs,param", [
    ({"n": 9}, "n"),
    ({"size": "big"}, "size"),
    ({"size": "1000x1000"}, "size"),
    ({"response_format": "gif"}, "response_format"),
    ({"prompt": ""}, "prompt"),
])
@pytest.mark.gen_test(timeout=20)
async def test_images_generate_bad_input_is_400_naming_the_param(sdk, fake, kwargs, param):
    arguments = {"model": "zimage-turbo", "prompt": "x", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(lambda c: c.images.generate(**arguments))
    assert info.value.param == param
    assert fake.calls["generate"] == 0


@pytest.mark.gen_test(timeout=20)
async def test_failed_generation_is_not_resubmitted_by_sdk_retries(sdk, fake):
    fake.outcome = "fail"
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(lambda c: c.images.generate(model="zimage-turbo", prompt="x"))  # SDK default: 2 retries
    assert info.value.status_code == 502
    assert info.value.response.headers["x-should-retry"] == "false"
    task_uuid = next(iter(fake.tasks))
    assert task_uuid in info.value.message
    assert fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=20)
async def test_timeout_after_acceptance_is_not_resubmitted(make_proxy, fake, io_loop):
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=0.05, max_attempts=4)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="zimage-free")
    with pytest.raises(openai.APIStatusError) as info:
        await io_loop.run_in_executor(None, lambda: client.images.generate(model="zimage-turbo", prompt="x"))
    assert info.value.status_code == 504
    assert fake.calls["generate"] == 1
    body = info.value.body
    assert body["message"].startswith("Task ") and next(iter(fake.tasks)) in body["message"]


@pytest.mark.gen_test(timeout=20)
async def test_failure_before_acceptance_is_retried_by_the_sdk(sdk, fake):
    fake.inject("generate", "500")
    result = await sdk(lambda c: c.images.generate(model="zimage-turbo", prompt="x"))
    assert len(result.data) == 1
    assert fake.calls["generate"] == 2 and len(fake.tasks) == 1


@pytest.mark.gen_test(timeout=20)
async def test_oversize_image_for_b64_is_502(make_proxy, fake, io_loop):
    proxy = make_proxy(max_image_bytes=100)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="zimage-free", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        await io_loop.run_in_executor(None, lambda: client.images.generate(
            model="zimage-turbo", prompt="a detailed city", size="1024x1024", response_format="b64_json"))
    assert info.value.status_code == 502
    assert "larger than 100 bytes" in info.value.message


@pytest.mark.gen_test(timeout=20)
async def test_same_idempotency_key_returns_the_same_task(sdk, proxy, fake):
    def create(client):
        return client.chat.completions.create(model="zimage-turbo", messages=[{"role": "user", "content": "owl"}],
                                              extra_headers={"Idempotency-Key": "key-1"})
    first = await sdk(create)
    second = await sdk(create)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert fake.calls["generate"] == 1
    # the same key for another request is a mistake the client should hear about
    code, body = await proxy.json("/v1/chat/completions", "POST", {"model": "zimage-turbo", "prompt": "cat"},
                                  headers={"Idempotency-Key": "key-1"})
    assert code == 400 and body["error"]["code"] == "idempotency_key_reused"
    # a new key is a new job
    code, body = await proxy.json("/v1/chat/completions", "POST", {"model": "zimage-turbo", "prompt": "owl"},
                                  headers={"Idempotency-Key": "key-2"})
    assert code == 200 and fake.calls["generate"] == 2


@pytest.mark.gen_test(timeout=20)
async def test_concurrent_requests_with_one_key_share_one_submission(proxy, fake):
    fake.hang_seconds = 0.3
    fake.inject("generate", "hang")
    body = {"model": "zimage-turbo", "prompt": "owl"}
    results = await asyncio.gather(*(proxy.json("/v1/chat/completions", "POST", body,
                                                headers={"Idempotency-Key": "same"}) for _ in range(5)))
    assert len({b["choices"][0]["message"]["content"] for _, b in results}) == 1
    assert fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=20)
async def test_idempotency_window_is_configurable(make_proxy, fake):
    proxy = make_proxy(idempotency_ttl=0.2)
    headers = {"Idempotency-Key": "k"}
    body = {"model": "zimage-turbo", "prompt": "owl"}
    await proxy.json("/v1/chat/completions", "POST", body, headers=headers)
    await asyncio.sleep(0.3)
    await proxy.json("/v1/chat/completions", "POST", body, headers=headers)
    assert fake.calls["generate"] == 2


@pytest.mark.gen_test(timeout=20)
async def test_models_list_and_retrieve(sdk):
    models = await sdk(lambda c: [m.id for m in c.models.list()])
    assert models == ["zimage-turbo", "zimage-base"]
    model = await sdk(lambda c: c.models.retrieve("zimage-turbo"))
    assert model.id == "zimage-turbo" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        await sdk(lambda c: c.models.retrieve("dall-e-3"))


@pytest.mark.gen_test(timeout=20)
async def test_model_aliases_are_one_configurable_table(make_proxy, fake, io_loop):
    default = make_proxy()
    code, _ = await default.json("/v1/images/generations", "POST", {"model": "dall-e-3", "prompt": "x"})
    assert code == 200 and fake.generate_bodies[-1]["model"] == "base"  # the spec's rule
    aliased = make_proxy(model_aliases="dall-e-3=turbo, gpt-image-1=flux2-klein-9b")
    client = openai.OpenAI(base_url=aliased.url + "/v1", api_key="zimage-free")
    ids = await io_loop.run_in_executor(None, lambda: [m.id for m in client.models.list()])
    assert ids == ["zimage-turbo", "zimage-base", "dall-e-3", "gpt-image-1"]
    await io_loop.run_in_executor(None, lambda: client.images.generate(model="gpt-image-1", prompt="x"))
    assert fake.generate_bodies[-1]["model"] == "flux2-klein-9b"


@pytest.mark.gen_test
async def test_new_routes_answer_wrong_methods_with_envelopes(proxy):
    for path, method in (("/v1/images/generations", "GET"), ("/v1/models", "POST"), ("/v1/models/x", "DELETE")):
        code, body = await proxy.json(path, method)
        assert code == 405 and set(body["error"]) == {"message", "type", "param", "code"}
