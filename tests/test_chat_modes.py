"""Chat that waits for the pictures, background prompts, and streaming, with the real SDK."""

import asyncio
import json
import re

import openai
import pytest

from helpers import connect
from helpers import eventually as wait_until

MESSAGES = [{"role": "user", "content": "a castle in the clouds"}]
TITLE_PROMPT = ("### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
                "### Output:\nJSON format: { \"title\": \"your concise title here\" }")
TAGS_PROMPT = ("### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 "
               "more specific subtopic tags.\n### Output:\nJSON format: { \"tags\": [\"tag1\", \"tag2\"] }")


@pytest.mark.gen_test(timeout=20)
async def test_wait_mode_answers_markdown_images_and_keeps_the_uuid(proxy, fake):
    code, body = await proxy.json("/v1/chat/completions", "POST", {
        "model": "zimage-turbo", "messages": MESSAGES, "extra_body": {"wait": True, "batch_size": 2}})
    assert code == 200
    message = body["choices"][0]["message"]
    task_uuid = message["task_uuid"]
    urls = re.findall(r"!\[image (\d)\]\((http://[^)]+\.png)\)", message["content"])
    assert [n for n, _ in urls] == ["1", "2"]
    assert all(task_uuid in url for _, url in urls)
    assert body["id"] == "chatcmpl-%s" % task_uuid


@pytest.mark.gen_test(timeout=20)
async def test_chat_wait_setting_makes_every_chat_wait(async_sdk, make_proxy, fake):
    proxy = make_proxy(chat_wait=True)
    response = await async_sdk(proxy).chat.completions.create(model="zimage-turbo", messages=MESSAGES)
    assert response.choices[0].message.content.startswith("![image 1](http://")
    # and a request can still opt out
    response = await async_sdk(proxy).chat.completions.create(model="zimage-turbo", messages=MESSAGES,
                                                       extra_body={"wait": False})
    assert response.choices[0].message.content in fake.tasks


@pytest.mark.gen_test(timeout=20)
async def test_wait_mode_failure_is_an_error_the_sdk_does_not_retry(async_sdk, proxy, fake):
    fake.outcome = "fail"
    with pytest.raises(openai.APIStatusError) as info:
        await async_sdk(proxy).chat.completions.create(model="zimage-turbo", messages=MESSAGES,
                                                       extra_body={"wait": True})
    assert info.value.status_code == 502
    assert fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=20)
async def test_background_prompts_in_wait_mode_start_no_job(async_sdk, make_proxy, fake):
    proxy = make_proxy(chat_wait=True)
    history = MESSAGES + [{"role": "assistant", "content": "![image 1](http://x/1.png)"},
                          {"role": "user", "content": TITLE_PROMPT}]
    response = await async_sdk(proxy).chat.completions.create(model="zimage-turbo", messages=history)
    assert json.loads(response.choices[0].message.content)["title"]
    tags = history[:-1] + [{"role": "user", "content": TAGS_PROMPT}]
    stream = await async_sdk(proxy).chat.completions.create(model="zimage-turbo", messages=tags, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert json.loads(text)["tags"]
    assert fake.calls["generate"] == 0


@pytest.mark.gen_test(timeout=20)
async def test_background_prompts_without_wait_start_no_job_either_unless_turned_off(async_sdk, make_proxy, fake):
    response = await async_sdk(make_proxy()).chat.completions.create(
        model="zimage-turbo", messages=[{"role": "user", "content": TITLE_PROMPT}])
    assert json.loads(response.choices[0].message.content)["title"] and fake.calls["generate"] == 0
    response = await async_sdk(make_proxy(answer_housekeeping=False)).chat.completions.create(
        model="zimage-turbo", messages=[{"role": "user", "content": TITLE_PROMPT}])
    assert response.choices[0].message.content in fake.tasks


@pytest.mark.gen_test(timeout=20)
async def test_stream_without_wait_sends_the_uuid(async_sdk, proxy, fake):
    stream = await async_sdk(proxy).chat.completions.create(model="zimage-turbo", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content in fake.tasks
    assert all(c.object == "chat.completion.chunk" and c.id == "chatcmpl-%s" % content for c in chunks)


@pytest.mark.gen_test(timeout=20)
async def test_stream_in_wait_mode_reports_progress_then_pictures(async_sdk, proxy, fake):
    fake.reads_to_complete = 4
    stream = await async_sdk(proxy).chat.completions.create(model="zimage-turbo", messages=MESSAGES, stream=True,
                                                      extra_body={"wait": True, "batch_size": 2})
    chunks = [chunk async for chunk in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    thinking = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert "Waiting in the queue (position 1)" in thinking
    assert "Generating: processing, 50%" in thinking and "Generating: processing, 75%" in thinking
    assert content.startswith("![image 1](") and "![image 2](" in content and "Generating" not in content
    assert content.rstrip().endswith(".png)")
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("where", ["content", "none"])
@pytest.mark.gen_test(timeout=20)
async def test_chat_progress_setting_puts_progress_in_content_or_nowhere(async_sdk, make_proxy, fake, where):
    fake.reads_to_complete = 4
    proxy = make_proxy(chat_progress=where)
    stream = await async_sdk(proxy).chat.completions.create(model="zimage-turbo", messages=MESSAGES, stream=True,
                                                      extra_body={"wait": True})
    chunks = [chunk async for chunk in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    thinking = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert not thinking and content.rstrip().endswith(".png)")
    assert ("Generating: processing, 50%" in content) == (where == "content")


async def raw_stream(proxy, body):
    stream = await connect(proxy.url)
    payload = json.dumps(body).encode()
    await stream.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
    head = await stream.read_until(b"\r\n\r\n")
    return stream, head


@pytest.mark.gen_test(timeout=20)
async def test_stream_sends_a_keepalive_at_every_poll_while_nothing_changes(proxy, fake):
    fake.reads_to_complete = 3
    task_body = {"model": "zimage-turbo", "messages": MESSAGES, "stream": True, "wait": True}
    stream, head = await raw_stream(proxy, task_body)
    fake.inject("task", "500", "500", "500")  # three polls that bring no news
    assert b"text/event-stream" in head and b"X-Accel-Buffering: no" in head
    raw = await stream.read_until_close()
    assert raw.count(b": waiting\n\n") >= 3
    assert b"data: [DONE]" in raw and b".png)" in raw


@pytest.mark.gen_test(timeout=20)
async def test_closing_a_stream_stops_its_wait(make_proxy, fake):
    fake.outcome = "never"
    proxy = make_proxy(poll_interval=0.05, max_attempts=1000, follow_budget=0)  # no follow-up: waiters only
    stream, _ = await raw_stream(proxy, {"model": "zimage-turbo", "messages": MESSAGES, "stream": True,
                                         "wait": True})
    watcher = proxy.gateway.watcher
    await wait_until(lambda: watcher.waiting == 1)
    stream.close()
    await wait_until(lambda: watcher.waiting == 0 and watcher.active_polls == 0)
    reads = sum(fake.task_reads.values())
    await asyncio.sleep(0.2)
    assert sum(fake.task_reads.values()) <= reads + 1


@pytest.mark.gen_test(timeout=20)
async def test_failure_mid_stream_is_raised_by_the_sdk(async_sdk, proxy, fake):
    fake.outcome = "fail"
    stream = await async_sdk(proxy).chat.completions.create(model="zimage-turbo", messages=MESSAGES, stream=True,
                                                      extra_body={"wait": True})
    received = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.append(chunk)
    assert "failed" in info.value.message and next(iter(fake.tasks)) in info.value.message
    assert received and received[0].choices[0].delta.role == "assistant"
