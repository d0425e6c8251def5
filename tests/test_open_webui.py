"""Open WebUI's requests to a chat model, against a gateway and the fake upstream: first rebuilt
from its source (its default task templates, native function calling with its builtin
generate_image tool and the tool's result, legacy mode's "image created" context), then, below,
exactly as a real Open WebUI 0.12.4 sent them (tests/recordings/, re-recorded as docs/testing.md
says)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

HISTORY = "<chat_history>\nUSER: a red fox sleeping in the snow\nASSISTANT: ![image 1](http://x/1.png)\n</chat_history>"
# Each default template's opening and output section, with its chat history, as Open WebUI fills it.
TEMPLATES = {
    "title": "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
             "### Guidelines:\n- The title should clearly represent the main theme or subject of the "
             "conversation.\n### Output:\nJSON format: { \"title\": \"your concise title here\" }\n"
             "### Chat History:\n" + HISTORY,
    "tags": "### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 "
            "more specific subtopic tags.\n### Output:\nJSON format: { \"tags\": [\"tag1\", \"tag2\", \"tag3\"] }\n"
            "### Chat History:\n" + HISTORY,
    "follow_ups": "### Task:\nSuggest 3-5 relevant follow-up questions or prompts that the user might naturally ask "
                  "next in this conversation as a **user**, based on the chat history, to help continue or "
                  "deepen the discussion.\n### Output:\nJSON format: { \"follow_ups\": [\"Question 1?\"] }\n"
                  "### Chat History:\n" + HISTORY,
    "queries": "### Task:\nAnalyze the chat history to determine the necessity of generating search queries, in the "
               "given language. By default, **prioritize generating 1-3 broad and relevant search queries**\n"
               "### Output:\nStrictly return in JSON format: {\n  \"queries\": [\"query1\", \"query2\"]\n}\n"
               "### Chat History:\n" + HISTORY,
    "image_prompt": "### Task:\nGenerate a detailed prompt for am image generation task based on the given language "
                    "and context. Describe the image as if you were explaining it to someone who cannot see it.\n"
                    "### Output:\nStrictly return in JSON format:\n{\n    \"prompt\": \"Your detailed "
                    "description here.\"\n}\n### Chat History:\n" + HISTORY,
    "autocomplete": "### Task:\nYou are an autocompletion system. Continue the text in `<text>` based on the "
                    "**completion type** in `<type>` and the given language.\n### Output Format:\nReturn in "
                    "JSON: { \"text\": \"<continuation>\" }\n<type>General</type>\n<text>a red fox</text>",
    "emoji": "Your task is to reflect the speaker's likely facial expression through a fitting emoji. Interpret "
             "emotions from the message and reflect their facial expression using fitting, diverse emojis.\n\n"
             "Message: ```a red fox sleeping in the snow```",
}
TOOLS_SYSTEM = ("Available Tools: [{\"name\": \"get_weather\", \"description\": \"Weather\", \"parameters\": {}}]\n\n"
                "Your task is to choose and return the correct tool(s) from the list of available tools based on "
                "the query. Follow these guidelines:\n- Return only the JSON object")
GENERATE_IMAGE = {"type": "function", "function": {
    "name": "generate_image", "description": "Generate an image based on a text prompt.",
    "parameters": {"type": "object", "properties": {"prompt": {"type": "string", "description": "The prompt"}},
                   "required": ["prompt"]}}}
OTHER_TOOLS = [{"type": "function", "function": {"name": "search_web", "description": "Search",
                                                 "parameters": {"type": "object", "properties": {
                                                     "query": {"type": "string"}}}}}]
LEGACY_CONTEXT = ("<context>The requested image has been created by the system successfully and is now being shown to "
                  "the user. Let the user know that the image they requested has been generated and is now shown "
                  "in the chat.</context>")


def chat(proxy, messages, **extra):
    return proxy.json("/v1/chat/completions", "POST", {"model": "zimage-turbo", "messages": messages,
                                                       "stream": False, **extra})


@pytest.mark.parametrize("wait", [False, True])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.gen_test(timeout=20)
async def test_every_housekeeping_template_is_answered_without_a_job_in_both_wait_modes(make_proxy, fake, name,
                                                                                       wait):
    proxy = make_proxy(chat_wait=wait)
    code, answer = await chat(proxy, [{"role": "user", "content": TEMPLATES[name]}])
    assert code == 200, answer
    content = answer["choices"][0]["message"]["content"]
    if name == "emoji":
        assert len(content) <= 4
    else:
        reply = json.loads(content[content.find("{"):content.rfind("}") + 1])  # as Open WebUI reads it
        expected = {"image_prompt": "prompt", "follow_ups": "follow_ups"}.get(name, name)
        assert expected in reply or name == "autocomplete" and "text" in reply
    assert fake.calls["generate"] == 0


@pytest.mark.gen_test(timeout=20)
async def test_legacy_tool_selection_prompt_makes_no_job(proxy, fake):
    query = "Query: History:\nUSER: \"\"\"a fox\"\"\"\nQuery: a fox"
    code, answer = await chat(proxy, [{"role": "system", "content": TOOLS_SYSTEM}, {"role": "user", "content": query}])
    assert code == 200 and json.loads(answer["choices"][0]["message"]["content"]) == {"tool_calls": []}
    assert fake.calls["generate"] == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.gen_test(timeout=30)
async def test_native_function_calling_makes_exactly_one_job_through_the_images_endpoint(async_sdk, proxy, fake,
                                                                                         stream):
    client = async_sdk(proxy)
    messages = [{"role": "user", "content": "a red fox sleeping in the snow"}]
    tools = [*OTHER_TOOLS, GENERATE_IMAGE]
    if stream:
        chunks = [c async for c in await client.chat.completions.create(
            model="zimage-turbo", messages=messages, tools=tools, stream=True)]
        calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        call_id, name, arguments = calls[0].id, calls[0].function.name, calls[0].function.arguments
    else:
        answer = await client.chat.completions.create(model="zimage-turbo", messages=messages, tools=tools)
        assert answer.choices[0].finish_reason == "tool_calls"
        call = answer.choices[0].message.tool_calls[0]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert name == "generate_image" and json.loads(arguments) == {"prompt": "a red fox sleeping in the snow"}
    assert fake.calls["generate"] == 0
    # Open WebUI runs its tool: the picture through its image engine, the gateway's images endpoint
    code, images = await proxy.json("/v1/images/generations", "POST", {
        "model": "zimage-turbo", "prompt": json.loads(arguments)["prompt"], "n": 1, "size": "512x512"})
    assert code == 200 and images["data"][0]["url"]
    # ... then sends the chat again, ending with the tool's result
    follow = messages + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function",
                                                             "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"status": "success", "images": 1})}]
    again = await client.chat.completions.create(model="zimage-turbo", messages=follow, tools=tools)
    assert again.choices[0].message.content and not again.choices[0].message.tool_calls
    assert fake.calls["generate"] == 1  # exactly one job, made by the image engine


@pytest.mark.gen_test(timeout=20)
async def test_a_tool_with_its_own_parameter_name_gets_the_prompt_under_it(make_proxy, fake):
    proxy = make_proxy(image_tools="paint")
    tool = {"type": "function", "function": {"name": "paint", "parameters": {
        "type": "object", "properties": {"description": {"type": "string"}, "size": {"type": "string"}},
        "required": ["description"]}}}
    code, answer = await chat(proxy, [{"role": "user", "content": "a lighthouse"}], tools=[tool],
                              extra_body={"width": 512, "height": 768})
    assert code == 200
    arguments = json.loads(answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"description": "a lighthouse", "size": "512x768"}
    code, answer = await chat(proxy, [{"role": "user", "content": "a lighthouse"}], tools=OTHER_TOOLS)
    assert code == 200 and fake.calls["generate"] == 1  # no image tool offered: the gateway draws as before


@pytest.mark.parametrize("wait", [False, True])
@pytest.mark.gen_test(timeout=30)
async def test_legacy_function_calling_draws_once(make_proxy, fake, wait):
    proxy = make_proxy(chat_wait=wait)
    code, images = await proxy.json("/v1/images/generations", "POST", {
        "model": "zimage-turbo", "prompt": "a red fox sleeping in the snow", "n": 1, "size": "512x512"})
    assert code == 200
    code, answer = await chat(proxy, [{"role": "system", "content": LEGACY_CONTEXT},
                                      {"role": "user", "content": "a red fox sleeping in the snow"}], stream=False)
    assert code == 200 and "picture" in answer["choices"][0]["message"]["content"]
    assert fake.calls["generate"] == 1


# -- Open WebUI 0.12.4, recorded live (tests/recordings/record_open_webui.py; docs/testing.md) -------------------

RECORDING = json.loads((Path(__file__).parent / "recordings" / "open_webui-0.12.4.json").read_text())


async def replay(proxy, recorded):
    """One recorded request, sent as Open WebUI sent it; (status, the answer's text: the message's
    content, a tool call's name and arguments, or the streamed deltas joined)."""
    response = await proxy.request(recorded["path"], recorded["method"], recorded["body"])
    body = response.body.decode()
    if recorded["body"].get("stream"):
        chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
        deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
        calls = [call for d in deltas for call in d.get("tool_calls") or []]
        if calls:
            return response.code, "%s %s" % (calls[0]["function"]["name"], calls[0]["function"]["arguments"])
        return response.code, "".join(d.get("content") or "" for d in deltas)
    answer = json.loads(body)
    if "data" in answer:  # the images endpoint
        return response.code, answer["data"]
    message = answer["choices"][0]["message"]
    return response.code, message["content"]


@pytest.mark.parametrize("chat_wait", [False, True])
@pytest.mark.gen_test(timeout=30)
async def test_every_recorded_housekeeping_request_makes_no_job(make_proxy, fake, chat_wait):
    proxy = make_proxy(chat_wait=chat_wait)
    for recorded in RECORDING["flows"]["housekeeping"]:
        code, text = await replay(proxy, recorded)
        assert code == 200, text
        assert text == "🎨" or text == "" or isinstance(json.loads(text[text.index("{"):text.rindex("}") + 1]), dict)
    assert fake.calls["generate"] == 0


@pytest.mark.gen_test(timeout=30)
async def test_the_recorded_native_flow_makes_exactly_one_job_through_the_images_endpoint(make_proxy, fake):
    proxy = make_proxy()
    offer, images, result = RECORDING["flows"]["native"]
    code, call = await replay(proxy, offer)
    assert code == 200 and call.startswith("generate_image ")
    assert json.loads(call.split(" ", 1)[1])["prompt"] == offer["body"]["messages"][-1]["content"]
    code, data = await replay(proxy, images)
    assert code == 200 and data[0]["b64_json"]
    code, text = await replay(proxy, result)
    assert code == 200 and text and fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_the_recorded_legacy_flow_makes_exactly_one_job(make_proxy, fake):
    proxy = make_proxy()
    for recorded in RECORDING["flows"]["legacy"]:
        code, text = await replay(proxy, recorded)
        assert code == 200, text
    assert fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_recorded_request_with_a_file_attached_draws_the_users_words(make_proxy, fake):
    proxy = make_proxy()
    (recorded,) = RECORDING["flows"]["rag"]
    assert recorded["body"]["messages"][-1]["content"].startswith("### Task:\nRespond to the user query")
    code, text = await replay(proxy, recorded)
    assert code == 200 and fake.calls["generate"] == 1
    assert fake.generate_bodies[0]["prompt"] == "draw our mascot on a beach"


@pytest.mark.gen_test(timeout=30)
async def test_the_recorded_plain_request_makes_one_job(make_proxy, fake):
    proxy = make_proxy()
    code, text = await replay(proxy, RECORDING["flows"]["picture"][0])
    assert code == 200 and text in fake.tasks and fake.calls["generate"] == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_recorded_streamed_chat_in_wait_mode_keeps_progress_out_of_the_message(make_proxy, fake):
    fake.reads_to_complete = 4
    proxy = make_proxy(chat_wait=True)
    (recorded,) = RECORDING["flows"]["rag"]  # streamed, as Open WebUI always asks
    response = await proxy.request(recorded["path"], recorded["method"], recorded["body"])
    chunks = [json.loads(line[6:]) for line in response.body.decode().splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    content = "".join(d.get("content") or "" for d in deltas)
    thinking = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert content.startswith("![image 1](") and "Generating" not in content and "Generating" in thinking
