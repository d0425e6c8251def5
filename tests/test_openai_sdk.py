"""The real `openai` package against the proxy: what SDK users actually run."""

import openai
import pytest


def sdk(proxy, **kw):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="zimage-free", **kw)


@pytest.mark.gen_test(timeout=20)
async def test_sdk_extra_body_parameters_arrive_upstream(proxy, fake, io_loop):
    client = sdk(proxy)

    def create():
        return client.chat.completions.create(
            model="zimage-turbo",
            messages=[{"role": "user", "content": "一只站在月球上的猫，超现实主义"}],
            extra_body={"prompt": "一只站在月球上的猫，超现实主义", "negative_prompt": "模糊,水印",
                        "batch_size": 4, "width": 1360, "height": 1024},
        )

    response = await io_loop.run_in_executor(None, create)
    task_uuid = response.choices[0].message.content
    assert task_uuid in fake.tasks
    sent = fake.generate_bodies[0]
    # The original proxy lost these: the SDK merges extra_body into the top level.
    assert (sent["batch_size"], sent["width"], sent["height"]) == (4, 1360, 1024)
    assert sent["negative_prompt"] == "模糊,水印"
    assert sent["model"] == "turbo"

    code, body = await proxy.json("/v1/images/%s" % task_uuid)
    assert code == 200 and len(body["image_urls"]) == 4


@pytest.mark.gen_test(timeout=20)
async def test_sdk_async_client_works_on_the_same_loop(async_sdk, proxy, fake):
    client = async_sdk(proxy)
    response = await client.chat.completions.create(
        model="zimage-turbo", messages=[{"role": "user", "content": "a lighthouse"}], extra_body={"steps": 12})
    assert response.choices[0].message.content in fake.tasks
    assert fake.generate_bodies[0]["steps"] == 12


@pytest.mark.gen_test(timeout=20)
async def test_sdk_raises_bad_request_naming_the_param(proxy, fake, io_loop):
    client = sdk(proxy, max_retries=0)

    def create():
        return client.chat.completions.create(
            model="zimage-turbo", messages=[{"role": "user", "content": "x"}], extra_body={"batch_size": 99})

    with pytest.raises(openai.BadRequestError) as info:
        await io_loop.run_in_executor(None, create)
    assert info.value.status_code == 400
    assert info.value.param == "batch_size"
    assert fake.calls["generate"] == 0
