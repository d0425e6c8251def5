"""The OpenAI Images surface, honoured: what is accepted is done, what cannot be done is refused
with a 400 naming the parameter. With the real OpenAI SDK against a real gateway and the fake."""

import base64
import functools
import io
import json
import subprocess
import sys

import openai
import pytest


def sdk(proxy):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="zimage-free", max_retries=0)


@pytest.mark.gen_test(timeout=30)
async def test_unsupported_values_are_refused_naming_the_parameter(proxy, fake, io_loop):
    client = sdk(proxy)
    for kwargs, param in (({"background": "transparent"}, "background"), ({"style": "bogus"}, "style"),
                          ({"quality": "ultra"}, "quality"), ({"moderation": "strict"}, "moderation"),
                          ({"output_format": "gif"}, "output_format"),
                          ({"extra_body": {"output_compression": 50}}, "output_compression")):  # png: lossless
        with pytest.raises(openai.BadRequestError) as raised:
            await io_loop.run_in_executor(None, functools.partial(client.images.generate, prompt="x", **kwargs))
        assert raised.value.body["param"] == param, kwargs
    assert fake.calls["generate"] == 0  # nothing reached the upstream


@pytest.mark.gen_test(timeout=30)
async def test_quality_becomes_steps_and_gpt_image_answers_carry_usage(proxy, fake, io_loop):
    client = sdk(proxy)
    answer = await io_loop.run_in_executor(None, lambda: client.images.generate(
        model="gpt-image-1", prompt="a harbour at night", quality="high", size="1024x1024", n=2))
    assert fake.generate_bodies[-1]["steps"] == 12  # high -> 12 steps
    assert answer.output_format == "png" and answer.quality == "high" and answer.size == "1024x1024"
    assert answer.background == "opaque" and answer.usage.total_tokens > 0
    assert answer.usage.output_tokens == 2 * 4160 and len(answer.data) == 2 and answer.data[0].b64_json
    await io_loop.run_in_executor(None, lambda: client.images.generate(prompt="x", quality="low", style="natural"))
    assert fake.generate_bodies[-1]["steps"] == 4
    await io_loop.run_in_executor(None, lambda: client.images.generate(prompt="x", quality="hd",
                                                                        extra_body={"steps": 6}))
    assert fake.generate_bodies[-1]["steps"] == 6  # given steps win


@pytest.mark.gen_test(timeout=30)
async def test_the_end_user_is_recorded_and_filterable(make_proxy, fake, io_loop, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.ops]\nkey = "sk-ops"\nadmin = true\n')
    database = tmp_path / "db.sqlite3"
    proxy = make_proxy(api_keys_file=str(keys), database=str(database))
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-ops", max_retries=0)
    await io_loop.run_in_executor(None, lambda: client.images.generate(prompt="for u-42", user="u-42"))
    await io_loop.run_in_executor(None, lambda: client.images.generate(prompt="for someone else", user="u-7"))
    code, body = await proxy.json("/admin/tasks?end_user=u-42", headers={"Authorization": "Bearer sk-ops"})
    assert code == 200 and [t["prompt"] for t in body["data"]] == ["for u-42"] and body["data"][0]["end_user"] == "u-42"
    with pytest.raises(openai.BadRequestError) as raised:
        await io_loop.run_in_executor(None, lambda: client.images.generate(prompt="x", user="a\nb"))
    assert raised.value.body["param"] == "user"
    code, usage = await proxy.json("/admin/usage?group_by=end_user", headers={"Authorization": "Bearer sk-ops"})
    assert code == 200 and {(r["end_user"], r["tasks"]) for r in usage["data"]} == {("u-42", 1), ("u-7", 1)}
    shown = await io_loop.run_in_executor(None, functools.partial(
        subprocess.run, [sys.executable, "-m", "zimage_tornado", "usage", "--database", str(database), "--by",
                         "end_user", "--json"], capture_output=True, text=True, timeout=30))
    assert shown.returncode == 0, shown.stderr
    assert sorted(json.loads(line)["end_user"] for line in shown.stdout.splitlines()) == ["u-42", "u-7"]


@pytest.mark.gen_test(timeout=30)
async def test_chat_refuses_what_it_would_silently_drop(make_proxy, fake, io_loop):
    proxy = make_proxy()
    client = sdk(proxy)
    with pytest.raises(openai.BadRequestError) as raised:
        await io_loop.run_in_executor(None, lambda: client.chat.completions.create(
            model="zimage-turbo", n=2, messages=[{"role": "user", "content": "two foxes"}]))
    assert raised.value.body["param"] == "n" and "batch_size" in raised.value.body["message"]
    picture = {"role": "user", "content": [{"type": "text", "text": "like this"},
                                           {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}
    code, body = await proxy.json("/v1/chat/completions", "POST", {"model": "zimage-turbo", "messages": [picture]})
    assert code == 400 and body["error"]["code"] == "unsupported_content"
    assert fake.calls["generate"] == 0
    lenient = make_proxy(ignore_image_parts=True)
    code, body = await lenient.json("/v1/chat/completions", "POST", {"model": "zimage-turbo", "messages": [picture]})
    assert code == 200 and fake.generate_bodies[-1]["prompt"] == "like this" and body["choices"]


@pytest.mark.gen_test(timeout=30)
async def test_jpeg_and_webp_are_real_conversions_of_the_picture(proxy, fake, io_loop):
    from PIL import Image
    client = sdk(proxy)
    for fmt, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
        answer = await io_loop.run_in_executor(None, functools.partial(
            client.images.generate, prompt="a fox", size="512x384", response_format="b64_json", output_format=fmt,
            output_compression=80))
        data = base64.b64decode(answer.data[0].b64_json)
        assert data.startswith(magic) and (fmt != "webp" or data[8:12] == b"WEBP")
        with Image.open(io.BytesIO(data)) as picture:
            assert picture.size == (512, 384) and picture.format == fmt.upper()
        assert answer.output_format == fmt
    answer = await io_loop.run_in_executor(None, lambda: client.images.generate(prompt="a fox", output_format="webp"))
    url = answer.data[0].url
    assert url.startswith(proxy.url + "/v1/images/") and "format=webp" in url  # the gateway's own, converting
    download = await proxy.request(url[len(proxy.url):])
    assert download.code == 200 and download.headers["Content-Type"] == "image/webp"
    assert download.body[:4] == b"RIFF" and download.body[8:12] == b"WEBP"
    assert (await proxy.request(url[len(proxy.url):].replace("webp", "gif"))).code == 400
    for compression in ("101", "9" * 5000, "\u00b2"):  # out of range, thousands of digits, not ASCII
        refused = await proxy.request(url[len(proxy.url):] + "&compression=" + compression)
        assert refused.code == 400 and json.loads(refused.body)["error"]["param"] == "compression"


@pytest.mark.gen_test(timeout=30)
async def test_a_picture_that_cannot_be_converted_is_a_502_naming_it(proxy, fake, io_loop):
    fake.image_override = b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10
    client = sdk(proxy)
    with pytest.raises(openai.APIStatusError) as raised:
        await io_loop.run_in_executor(None, lambda: client.images.generate(
            prompt="broken", response_format="b64_json", output_format="jpeg"))
    assert raised.value.status_code == 502 and "could not be converted to jpeg" in raised.value.message


@pytest.mark.gen_test(timeout=40)
async def test_streamed_image_generation_yields_one_completed_event_per_picture(make_proxy, fake, io_loop):
    from PIL import Image
    fake.seconds_to_complete = 1.0
    proxy = make_proxy(poll_interval=0.2, max_attempts=100)
    client = sdk(proxy)

    def stream():
        return [event for event in client.images.generate(model="gpt-image-1", prompt="three foxes", n=3,
                                                           size="256x256", stream=True, partial_images=2)]
    events = await io_loop.run_in_executor(None, stream)
    assert [event.type for event in events] == ["image_generation.completed"] * 3
    for event in events:
        with Image.open(io.BytesIO(base64.b64decode(event.b64_json))) as picture:
            assert picture.format == "PNG" and picture.size == (256, 256)
        assert event.size == "256x256" and event.output_format == "png" and event.usage.total_tokens > 0
    raw = await proxy.request("/v1/images/generations", "POST", {"prompt": "a slow one", "stream": True})
    assert raw.body.decode().count(": waiting\n\n") >= 3  # a heartbeat after every status read while it ran
