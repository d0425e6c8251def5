"""zimage.run as its later clients see it: camelCase submits (followed when the service asks for
them), the moderation step, and batches followed by their parent's uuid through batch-status,
against the fake playing each."""

import pytest

CHAT = {"model": "zimage-turbo", "messages": [{"role": "user", "content": "a paper crane"}]}


def wait(body, **extra):
    return {**body, "extra_body": {"wait": True, **extra}}


@pytest.mark.gen_test(timeout=20)
async def test_auto_follows_the_service_to_camel_case_with_one_job(make_proxy, fake):
    fake.protocol = "camel"
    proxy = make_proxy()
    code, body = await proxy.json("/v1/chat/completions", "POST", wait(CHAT))
    assert code == 200 and "![image 1](" in body["choices"][0]["message"]["content"]
    assert len(fake.tasks) == 1  # the flat body was refused (400, no job), the camel one made the task
    assert fake.generate_bodies[-1]["modelType"] == "turbo" and fake.generate_bodies[-1]["batchSize"] == 1
    calls = fake.calls["generate"]
    code, _ = await proxy.json("/v1/chat/completions", "POST", CHAT)
    assert code == 200 and fake.calls["generate"] == calls + 1  # remembered: camel straight away


@pytest.mark.gen_test(timeout=20)
async def test_flat_stays_flat_and_the_refusal_reaches_the_caller(make_proxy, fake):
    fake.protocol = "camel"
    proxy = make_proxy(upstream_protocol="flat")
    code, body = await proxy.json("/v1/chat/completions", "POST", CHAT)
    assert code == 400 and "modelType" in body["error"]["message"] and not fake.tasks


@pytest.mark.gen_test(timeout=20)
async def test_the_moderation_step_is_taken_when_asked_and_a_refusal_makes_no_job(make_proxy, fake):
    fake.protocol, fake.moderation = "camel", True
    proxy = make_proxy(ip_images_per_day=3)
    code, body = await proxy.json("/v1/chat/completions", "POST", wait(CHAT))
    assert code == 200 and len(fake.tasks) == 1 and fake.calls["moderation"] == 1
    assert fake.generate_bodies[-1]["promptModerationToken"] in fake.tokens
    refused = {"model": "zimage-turbo", "messages": [{"role": "user", "content": "something forbidden"}]}
    code, body = await proxy.json("/v1/chat/completions", "POST", refused)
    assert code == 400 and body["error"]["code"] == "content_policy_violation" and len(fake.tasks) == 1
    for _ in range(2):  # the refused one spent none of the day's 3 images
        assert (await proxy.json("/v1/chat/completions", "POST", CHAT))[0] == 200
    assert (await proxy.json("/v1/chat/completions", "POST", CHAT))[0] == 429


@pytest.mark.parametrize("restarted", [False, True])
@pytest.mark.gen_test(timeout=20)
async def test_a_batch_is_followed_by_its_parent_uuid_even_by_a_gateway_that_did_not_submit_it(
        make_proxy, fake, restarted):
    fake.protocol, fake.batches = "camel", True
    proxy = make_proxy(upstream_protocol="camel")
    code, body = await proxy.json("/v1/chat/completions", "POST", {**CHAT, "extra_body": {"batch_size": 3}})
    parent = body["choices"][0]["message"]["content"]
    assert parent in fake.parents and len(fake.parents[parent]) == 3
    reader = make_proxy(upstream_protocol="camel") if restarted else proxy
    code, ready = await reader.json("/v1/images/%s" % parent)
    assert code == 200 and ready["status"] == "completed" and len(ready["image_urls"]) == 3
    assert [url.rsplit("/", 1)[1] for url in ready["image_urls"]] == ["%s_0.png" % child
                                                                     for child in fake.parents[parent]]
