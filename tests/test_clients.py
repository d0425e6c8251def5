"""What real OpenAI clients trip over, each tried with the real client library: the OpenAI SDK,
LangChain's OpenAI and ChatOpenAI, LiteLLM, and Open WebUI's requests replayed exactly."""

import base64
import json
import os

import openai
import pytest

OPEN_WEBUI_IMAGE_TASK = """### Task:
Generate a detailed prompt for am image generation task based on the given language and context. \
Describe the image as if you were explaining it to someone who cannot see it. Include relevant details, \
colors, shapes, and any other important elements.

### Guidelines:
- Be descriptive and detailed, focusing on the most important aspects of the image.
- Avoid making assumptions or adding information not present in the image.
- Use the chat's primary language; default to English if multilingual.
- If the image is too complex, focus on the most prominent elements.

### Output:
Strictly return in JSON format:
{
    "prompt": "Your detailed description here."
}

### Chat History:
<chat_history>
USER: hello
ASSISTANT: Hi! What should I draw?
USER: a red fox sleeping in the snow
at dawn, soft light
</chat_history>"""


def sdk(proxy, **kw):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="zimage-free", **kw)


@pytest.mark.gen_test(timeout=20)
async def test_gpt_image_models_answer_base64_as_openai_does(proxy, fake, io_loop):
    client = sdk(proxy)
    result = await io_loop.run_in_executor(None, lambda: client.images.generate(
        model="gpt-image-1", prompt="a lighthouse at dusk", size="256x256"))
    image = base64.b64decode(result.data[0].b64_json)  # OpenAI's own example, unchanged
    assert image.startswith(b"\x89PNG")
    url = await io_loop.run_in_executor(None, lambda: client.images.generate(
        model="dall-e-3", prompt="a lighthouse at dusk", size="256x256"))
    assert url.data[0].url and url.data[0].b64_json is None  # other models keep url by default


@pytest.mark.gen_test(timeout=20)
async def test_open_webui_image_button_gets_the_users_words_as_its_prompt(make_proxy, fake):
    proxy = make_proxy(chat_wait=True)
    body = {"model": "zimage-turbo", "stream": False,
            "messages": [{"role": "user", "content": OPEN_WEBUI_IMAGE_TASK}]}
    code, answer = await proxy.json("/v1/chat/completions", "POST", body)
    assert code == 200
    content = answer["choices"][0]["message"]["content"]
    reply = json.loads(content[content.find("{"):content.rfind("}") + 1])  # as Open WebUI parses it
    assert reply.get("prompt", []) == "a red fox sleeping in the snow\nat dawn, soft light"
    assert reply["title"] == "a red fox sleeping in the snow"  # the user's words, not a fixed title
    assert fake.calls["generate"] == 0  # housekeeping makes no image job
    # ... then Open WebUI asks for the picture with exactly this body
    code, images = await proxy.json("/v1/images/generations", "POST", {
        "model": "zimage-turbo", "prompt": reply["prompt"], "n": 1, "size": "512x512", "response_format": "b64_json"})
    assert code == 200 and base64.b64decode(images["data"][0]["b64_json"]).startswith(b"\x89PNG")


@pytest.mark.gen_test(timeout=30)
async def test_an_sdk_retry_after_its_timeout_is_not_a_new_paid_job(make_proxy, fake, io_loop):
    fake.seconds_to_complete = 8
    proxy = make_proxy(poll_interval=0.1, max_attempts=200)
    client = sdk(proxy, timeout=0.6, max_retries=2)
    with pytest.raises(openai.APITimeoutError):  # the client gave up: three requests sent
        await io_loop.run_in_executor(None, lambda: client.images.generate(model="zimage-turbo", prompt="a slow fox"))
    assert fake.calls["generate"] == 1  # the two retries were answered with the first task
    # a new, identical request (no retry header) is a new picture, as the user asked
    await proxy.submit("a slow fox")
    assert fake.calls["generate"] == 2


@pytest.mark.gen_test(timeout=30)
async def test_legacy_completions_with_langchain_and_the_sdk(make_proxy, fake, io_loop):
    from langchain_openai import OpenAI
    proxy = make_proxy()
    llm = OpenAI(base_url=proxy.url + "/v1", api_key="zimage-free", model="zimage-turbo")
    text = await io_loop.run_in_executor(None, lambda: llm.invoke("a lighthouse"))
    assert text in fake.tasks  # the task uuid, as chat answers it
    chunks = await io_loop.run_in_executor(None, lambda: list(llm.stream("a harbour")))
    assert "".join(chunks) in fake.tasks
    waited = await io_loop.run_in_executor(None, lambda: sdk(proxy).completions.create(
        model="zimage-turbo", prompt="a lighthouse", extra_body={"wait": True}))
    assert waited.object == "text_completion" and waited.choices[0].text.startswith("![image 1](http")


@pytest.mark.gen_test(timeout=30)
async def test_stream_usage_reaches_langchain(make_proxy, fake, io_loop):
    from langchain_openai import ChatOpenAI
    proxy = make_proxy()
    chat = ChatOpenAI(base_url=proxy.url + "/v1", api_key="zimage-free", model="zimage-turbo", stream_usage=True)
    chunks = await io_loop.run_in_executor(None, lambda: list(chat.stream("a lighthouse")))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.content in fake.tasks
    usage = merged.usage_metadata
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (0, 0, 0)


@pytest.mark.gen_test(timeout=60)
async def test_litellm_reaches_the_gateway(proxy, fake, io_loop):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    import litellm
    response = await io_loop.run_in_executor(None, lambda: litellm.completion(
        model="openai/zimage-turbo", api_base=proxy.url + "/v1", api_key="zimage-free",
        messages=[{"role": "user", "content": "a lighthouse"}]))
    assert response.choices[0].message.content in fake.tasks


@pytest.mark.parametrize("method, path", [("POST", "/v1/images/edits"), ("POST", "/v1/images/variations"),
                                          ("POST", "/v1/embeddings"), ("POST", "/v1/audio/speech"),
                                          ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/responses"),
                                          ("GET", "/v1/responses/resp_123")])
@pytest.mark.gen_test
async def test_endpoints_not_offered_say_so_with_a_404(proxy, fake, method, path):
    code, body = await proxy.json(path, method, {"model": "zimage-turbo", "input": "x"} if method == "POST" else None)
    assert code == 404 and body["error"]["code"] == "unsupported_endpoint"
    assert sum(fake.calls.values()) == 0
