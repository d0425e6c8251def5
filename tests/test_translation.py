"""OpenAI request -> GenerationRequest, without a server."""

import dataclasses
import math

import pytest

from zimage_tornado.config import Settings
from zimage_tornado.errors import ApiError
from zimage_tornado.openai_api import ModelTable, chat_completion, parse_chat_request
from zimage_tornado.validation import task_id, wait_budget

LIMITS = Settings().limits
MODELS = ModelTable()


def parse(body):
    return parse_chat_request(body, LIMITS, MODELS)


def rejected(body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


def test_spec_example_translates_with_nested_parameters():
    request = parse({
        "model": "zimage-turbo",
        "messages": [{"role": "user", "content": "a cat"}],
        "extra_body": {"prompt": "a cat on the moon", "negative_prompt": "blur", "batch_size": 4,
                       "width": 1360, "height": 1024, "steps": 8, "cfg_scale": 7},
    })
    g = request.generation
    assert (g.prompt, g.negative_prompt, g.batch_size, g.width, g.height, g.steps, g.cfg_scale) == (
        "a cat on the moon", "blur", 4, 1360, 1024, 8, 7)
    assert g.model == "turbo"
    assert request.model == "zimage-turbo"


def test_a_request_without_a_model_gets_the_one_default_model_everywhere():
    assert parse({"messages": [{"role": "user", "content": "x"}]}).model == "zimage-turbo"


def test_defaults_follow_the_spec_table():
    g = parse({"model": "zimage", "messages": [{"role": "user", "content": "x"}]}).generation
    assert (g.negative_prompt, g.model, g.batch_size, g.width, g.height, g.steps, g.cfg_scale) == (
        "", "base", 1, 1024, 1024, 8, 7)


def test_top_level_parameters_are_read_as_the_sdk_sends_them():
    g = parse({"model": "m", "messages": [{"role": "user", "content": "x"}],
               "batch_size": 3, "width": 512, "height": 768, "prompt": "top"}).generation
    assert (g.batch_size, g.width, g.height, g.prompt) == (3, 512, 768, "top")


def test_nested_wins_over_top_level():
    g = parse({"model": "m", "prompt": "top", "batch_size": 2,
               "extra_body": {"prompt": "nested", "batch_size": 4}}).generation
    assert (g.prompt, g.batch_size) == ("nested", 4)


def test_prompt_falls_back_to_the_last_user_message():
    body = {"model": "m", "messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "uuid"},
        {"role": "user", "content": [{"type": "text", "text": "a red"},
                                     {"type": "image_url", "image_url": {"url": "http://x"}},
                                     {"type": "text", "text": "bicycle"}]},
    ]}
    with pytest.raises(ApiError) as refused:  # an image part would be dropped silently: refused instead
        parse(body)
    assert refused.value.code == "unsupported_content"
    lenient = dataclasses.replace(LIMITS, ignore_image_parts=True)
    assert parse_chat_request(body, lenient, MODELS).generation.prompt == "a red\nbicycle"


@pytest.mark.parametrize("name,expected", [
    ("zimage-turbo", "turbo"), ("Z-Image-TURBO", "turbo"), ("zimage", "base"), ("zimage-base", "base"),
])
def test_model_mapping(name, expected):
    assert MODELS.upstream(name) == expected


def test_alias_table_overrides_the_rule():
    assert ModelTable({"dall-e-3": "turbo"}).upstream("DALL-E-3") == "turbo"


@pytest.mark.parametrize("body,param", [
    ([1, 2], None),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"model": "m", "prompt": "   "}, "prompt"),
    ({"model": "m", "prompt": 7}, "prompt"),
    ({"model": 3, "prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "extra_body": []}, "extra_body"),
    ({"model": "m", "prompt": "x", "batch_size": True}, "batch_size"),
    ({"model": "m", "prompt": "x", "batch_size": "4"}, "batch_size"),
    ({"model": "m", "prompt": "x", "batch_size": 5}, "batch_size"),
    ({"model": "m", "prompt": "x", "batch_size": 0}, "batch_size"),
    ({"model": "m", "prompt": "x", "batch_size": 2.0}, "batch_size"),
    ({"model": "m", "prompt": "x", "extra_body": {"width": 4096}}, "width"),
    ({"model": "m", "prompt": "x", "height": 32}, "height"),
    ({"model": "m", "prompt": "x", "width": 1000}, "width"),
    ({"model": "m", "prompt": "x", "steps": 51}, "steps"),
    ({"model": "m", "prompt": "x", "steps": 0}, "steps"),
    ({"model": "m", "prompt": "x", "cfg_scale": math.nan}, "cfg_scale"),
    ({"model": "m", "prompt": "x", "cfg_scale": "7"}, "cfg_scale"),
    ({"model": "m", "prompt": "x", "negative_prompt": ["a"]}, "negative_prompt"),
    ({"model": "m", "prompt": "x" * 8001}, "prompt"),
])
def test_bad_input_names_the_param(body, param):
    assert rejected(body).param == param


def test_limits_are_configurable():
    limits = dataclasses.replace(LIMITS, max_batch_size=8)
    request = parse_chat_request({"model": "m", "prompt": "x", "batch_size": 8}, limits, MODELS)
    assert request.generation.batch_size == 8


def test_chat_completion_shape():
    body = chat_completion("zimage-turbo", "abc-123", created=5)
    assert body["id"] == "chatcmpl-abc-123"
    assert body["object"] == "chat.completion"
    assert body["model"] == "zimage-turbo"
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "abc-123", "task_uuid": "abc-123"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a%2Fb", "a?b", "x" * 65, "é", "a b", "a.b"])
def test_task_ids_are_restricted(bad):
    with pytest.raises(ApiError):
        task_id(bad)


def test_wait_budget():
    assert wait_budget(None, None, 300) == 300
    assert wait_budget("10", None, 300) == 10
    assert wait_budget("1000", None, 300) == 300
    assert wait_budget(None, "false", 300) == 0
    assert wait_budget("0", None, 300) == 0
    for timeout, wait in (("-1", None), ("soon", None), ("nan", None), (None, "maybe")):
        with pytest.raises(ApiError):
            wait_budget(timeout, wait, 300)
