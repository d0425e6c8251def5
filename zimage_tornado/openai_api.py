"""Translation between OpenAI-shaped requests/responses and the gateway's value objects.

Only this module knows OpenAI's shapes; it is pure (no I/O) so it is tested without a server.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from zimage_tornado import frontends, validation, webhooks
from zimage_tornado.webhooks import WebhookRequest
from zimage_tornado.domain import GenerationRequest, Task
from zimage_tornado.errors import ApiError, invalid
from zimage_tornado.links import LinkMaker
from zimage_tornado.validation import Limits

MODEL_IDS = ("zimage-turbo", "zimage-base")
DEFAULT_MODEL = "zimage-turbo"  # a request without `model`; the same as the CLI's and the playground's


class ModelTable:
    """OpenAI model name -> upstream model name: explicit aliases first, then the spec's rule
    ("turbo" when the name contains "turbo", in any case, else "base")."""

    def __init__(self, aliases: Mapping[str, str] | None = None) -> None:
        self._aliases = {name.lower(): target for name, target in (aliases or {}).items()}
        self.names = [*MODEL_IDS, *(aliases or {})]  # what GET /v1/models lists

    def knows(self, name: str) -> bool:
        return name.lower() in {n.lower() for n in self.names}

    def upstream(self, name: str) -> str:
        alias = self._aliases.get(name.lower())
        if alias is not None:
            return alias
        return "turbo" if "turbo" in name.lower() else "base"


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion, or a legacy text completion (`text`): the same job, other shapes."""

    generation: GenerationRequest
    model: str  # as the client named it, echoed back
    stream: bool = False
    wait: bool | None = None  # None: the server's chat_wait setting decides
    canned: str | None = None  # a front-end's housekeeping or follow-up: answered so, no job made
    tool_call: frontends.ToolCall | None = None  # answered with this call: the front-end makes the picture
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    text: bool = False  # POST /v1/completions
    end_user: str | None = None  # OpenAI's `user`, recorded with the task
    webhook: WebhookRequest | None = None  # call back when it ends (webhooks.py)


@dataclass(frozen=True)
class ImagesRequest:
    generation: GenerationRequest
    model: str
    response_format: str = "url"
    quality: str = "auto"
    background: str = "auto"
    gpt_image: bool = False  # answer as gpt-image does: size, quality, output_format, background, usage
    end_user: str | None = None
    output_format: str = "png"
    output_compression: int | None = None
    stream: bool = False  # image_generation.completed events (b64_json), after heartbeats while it runs
    webhook: WebhookRequest | None = None


# quality (gpt-image's and DALL·E 3's words) -> steps, unless `steps` is given
QUALITY_STEPS = {"low": 4, "medium": 8, "standard": 8, "auto": 8, "high": 12, "hd": 12}
# gpt-image's output tokens for a 1024x1024 picture, by quality; other sizes in proportion to their area
IMAGE_TOKENS = {"low": 272, "medium": 1056, "standard": 1056, "auto": 1056, "high": 4160, "hd": 4160}
END_USER_MAX = 256


def end_user(params: dict[str, Any]) -> str | None:
    """OpenAI's `user`: an id of the caller's own end user, recorded with the task."""
    value = params.get("user")
    if value is None:
        return None
    user = validation.string(value, "user", max_length=END_USER_MAX, allow_empty=False)
    if not user.isprintable():
        raise invalid("user must not contain control characters", param="user")
    return user


def unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_value")


def image_options(params: dict[str, Any], fields: dict[str, Any], limits: Limits) -> tuple[str, str]:
    """The Images API's knobs, honoured or refused (never accepted and ignored): (quality, background)."""
    background = validation.choice(params.get("background") or "auto", "background", ("auto", "opaque", "transparent"))
    if background == "transparent":
        raise unsupported("Z-Image cannot draw a transparent background; use auto or opaque", "background")
    quality = validation.choice(params.get("quality") or "auto", "quality", tuple(QUALITY_STEPS))
    if params.get("quality") is not None and "steps" not in fields:
        fields["steps"] = min(QUALITY_STEPS[quality], limits.max_steps)
    if params.get("style") is not None:
        validation.choice(params["style"], "style", ("vivid", "natural"))  # accepted: it changes nothing here
    if params.get("moderation") is not None:
        validation.choice(params["moderation"], "moderation", ("auto", "low"))
    if params.get("partial_images") not in (None, 0):
        validation.integer(params["partial_images"], "partial_images", 0, 3)
    return quality, background


def output_options(params: dict[str, Any]) -> tuple[str, int | None]:
    """output_format (png, jpeg, webp: converted by the gateway) and output_compression (0-100, for
    the lossy two only)."""
    output_format = validation.choice(params.get("output_format") or "png", "output_format", ("png", "jpeg", "webp"))
    compression = None
    if params.get("output_compression") is not None:
        compression = validation.integer(params["output_compression"], "output_compression", 0, 100)
        if output_format == "png":
            raise unsupported("output_compression applies to jpeg and webp, not png", "output_compression")
    return output_format, compression


def image_completed_event(request: ImagesRequest, b64: str, per_image: dict[str, Any]) -> dict[str, Any]:
    """One picture of a streamed images.generate, as OpenAI's `image_generation.completed`."""
    g = request.generation
    return {"type": "image_generation.completed", "b64_json": b64, "created_at": int(time.time()),
            "size": "%dx%d" % (g.width, g.height), "quality": request.quality,
            "background": "opaque" if request.background == "auto" else request.background,
            "output_format": request.output_format, "usage": per_image}


def image_usage(request: ImagesRequest) -> dict[str, Any]:
    """gpt-image's usage object: input tokens from the prompt (about four characters a token),
    output tokens per picture by quality and area (docs/api.md)."""
    g = request.generation
    per_image = round(IMAGE_TOKENS[request.quality] * g.width * g.height / (1024 * 1024))
    prompt_tokens = max(1, -(-len(g.prompt) // 4))
    output = per_image * g.batch_size
    return {"input_tokens": prompt_tokens, "output_tokens": output, "total_tokens": prompt_tokens + output,
            "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0}}


def merged_params(body: Any) -> dict[str, Any]:
    """The body's fields with its `extra_body` object laid over them.

    The curl examples nest parameters in "extra_body"; the OpenAI SDK merges extra_body= into the
    top level of the JSON. Read both; nested wins."""
    body = validation.json_object(body)
    nested = body.get("extra_body")
    nested = {} if nested is None else validation.json_object(nested, "extra_body")
    return {**body, **{k: v for k, v in nested.items() if v is not None}}


def model_name(params: dict[str, Any]) -> str:
    model = params.get("model")
    return DEFAULT_MODEL if model is None else validation.string(model, "model", max_length=200, allow_empty=False)


def parse_chat_request(body: Any, limits: Limits, models: ModelTable) -> ChatRequest:
    params = merged_params(body)
    model = model_name(params)
    messages = params.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise invalid("messages must be an array of message objects", param="messages", code="invalid_type")
    stream = validation.boolean(params.get("stream", False), "stream")
    wait = None if params.get("wait") is None else validation.boolean(params["wait"], "wait")
    include_usage = stream_usage(params)
    if params.get("n") is not None and validation.integer(params["n"], "n", 1, 128) > 1:
        raise unsupported("One chat completion carries one task: for several pictures, set batch_size (extra_body) "
                          "instead of n", "n")
    canned, call = None, None
    if params.get("prompt") is not None:
        prompt = validation.prompt(params["prompt"], limits)
    else:
        messages = messages or []
        said = frontends.user_request(last_user_text(messages, limits.ignore_image_parts))  # no retrieval preamble
        if not said.strip():
            raise invalid("The last user message has no text: write what to draw in it", param="messages",
                          code="missing_value")
        prompt = validation.prompt(said, limits, param="messages")
        canned = front_end_answer(messages, prompt, limits)
    fields = validation.generation_fields(params, limits)
    if canned is None and params.get("prompt") is None:
        tool = frontends.image_tool(params.get("tools"), limits.image_tools)
        if tool is not None:  # the front-end's image tool makes the picture, with its own settings
            size = (fields["width"], fields["height"]) if "width" in fields else None
            call = frontends.new_call(tool[0], frontends.call_arguments(tool[1], prompt, size))
    generation = GenerationRequest(prompt=prompt, model=models.upstream(model), **fields)
    return ChatRequest(generation, model, stream, wait, canned, call, include_usage, end_user=end_user(params),
                       webhook=webhooks.requested(params))


def front_end_answer(messages: list[Any], prompt: str, limits: Limits) -> str | None:
    """What answers a chat front-end's request that asks for no new picture, or None: its
    housekeeping templates, the legacy "image created" context, an image tool's result."""
    if not limits.answer_housekeeping:
        return None
    systems = [m["content"] for m in messages if isinstance(m, dict) and m.get("role") == "system"
               and isinstance(m.get("content"), str)]
    template = frontends.housekeeping(prompt, systems)
    if template is not None:
        return frontends.housekeeping_reply(template, prompt)
    if frontends.legacy_context(messages):
        failed = any("attempted" in text.lower() for text in systems)
        return frontends.NOT_MADE if failed else frontends.MADE
    if frontends.answered_tool(messages, limits.image_tools):
        return frontends.MADE
    return None


def parse_images_result(query: Callable[[str], str | None], record: Any) -> ImagesRequest:
    """`GET /v1/images/generations/{uuid}`: the answer `POST /v1/images/generations` would have
    given for a recorded task (store.TaskRecord), in the form the query asks for."""
    params: dict[str, Any] = {name: query(name) for name in ("response_format", "output_format")}
    text = query("output_compression")
    if text is not None:
        params["output_compression"] = validation.integer(validation.whole_number(text, 3),
                                                          "output_compression", 0, 100)
    output_format, compression = output_options(params)
    gpt_image = record.model.lower().startswith("gpt-image") or params["output_format"] is not None
    default_format = "b64_json" if record.model.lower().startswith("gpt-image") else "url"
    response_format = validation.choice(params["response_format"] or default_format, "response_format",
                                        ("url", "b64_json"))
    generation = GenerationRequest(prompt="", width=record.width, height=record.height, batch_size=record.batch_size,
                                   steps=record.steps)
    return ImagesRequest(generation, record.model, response_format, gpt_image=gpt_image, output_format=output_format,
                         output_compression=compression)


def parse_completion_request(body: Any, limits: Limits, models: ModelTable) -> ChatRequest:
    """`POST /v1/completions` (LangChain's OpenAI, llama-index's OpenAILike): `prompt` is a
    string, or a list of them (the last one is the picture's)."""
    params = merged_params(body)
    model = model_name(params)
    text = params.get("prompt")
    if isinstance(text, list) and text and all(isinstance(item, str) for item in text):
        text = text[-1]
    if text is None:
        raise invalid("prompt is required", param="prompt", code="missing_value")
    prompt = validation.prompt(text, limits)
    stream = validation.boolean(params.get("stream", False), "stream")
    wait = None if params.get("wait") is None else validation.boolean(params["wait"], "wait")
    fields = validation.generation_fields(params, limits)
    generation = GenerationRequest(prompt=prompt, model=models.upstream(model), **fields)
    return ChatRequest(generation, model, stream, wait, include_usage=stream_usage(params), text=True,
                       end_user=end_user(params), webhook=webhooks.requested(params))


def stream_usage(params: dict[str, Any]) -> bool:
    options = params.get("stream_options")
    if options is None:
        return False
    options = validation.json_object(options, "stream_options")
    return validation.boolean(options.get("include_usage", False), "stream_options.include_usage")


def parse_images_request(body: Any, limits: Limits, models: ModelTable) -> ImagesRequest:
    """`POST /v1/images/generations`: OpenAI's names (n, size) plus the Z-Image extras."""
    params = merged_params(body)
    model = model_name(params)
    prompt = validation.prompt(params.get("prompt"), limits) if params.get("prompt") is not None else None
    if prompt is None:
        raise invalid("prompt is required", param="prompt", code="missing_value")
    stream = validation.boolean(params.get("stream", False), "stream")
    fields = validation.generation_fields(params, limits)
    quality, background = image_options(params, fields, limits)
    output_format, compression = output_options(params)
    if params.get("n") is not None:
        fields["batch_size"] = validation.integer(params["n"], "n", 1, limits.max_batch_size)
    dimensions = validation.size(params.get("size"), limits)
    if dimensions is not None:
        fields["width"], fields["height"] = dimensions
    # gpt-image models always answer base64 at OpenAI: code written for them reads b64_json.
    gpt_image = model.lower().startswith("gpt-image") or any(
        params.get(name) is not None for name in ("output_format", "background", "moderation")) or (
        params.get("quality") in ("low", "medium", "high"))
    default_format = "b64_json" if model.lower().startswith("gpt-image") else "url"
    response_format = validation.choice(params.get("response_format") or default_format, "response_format",
                                        ("url", "b64_json"))
    generation = GenerationRequest(prompt=prompt, model=models.upstream(model), **fields)
    return ImagesRequest(generation, model, response_format, quality, background, gpt_image, end_user(params),
                         output_format, compression, stream, webhooks.requested(params))


def last_user_text(messages: list[Any], ignore_images: bool = False) -> str:
    """The text of the last user message (chat clients send the whole history)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message.get("content"), ignore_images)
    raise invalid("No prompt: give extra_body.prompt, prompt, or a user message", param="messages",
                  code="missing_value")


def message_text(content: Any, ignore_images: bool = False) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if any(isinstance(part, dict) and part.get("type") in ("image_url", "input_image") for part in content) \
                and not ignore_images:
            raise ApiError(400, "This model draws from text only: the message's image part would be ignored "
                                "(remove it, or start the gateway with ignore_image_parts = true)",
                           param="messages", code="unsupported_content")
        content = [part for part in content if not (isinstance(part, dict) and part.get("type") in (
            "image_url", "input_image"))]
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        strings = [text for text in texts if isinstance(text, str)]
        if len(strings) == len(texts):
            return "\n".join(strings)
    raise invalid("message content must be a string or an array of text parts", param="messages",
                  code="invalid_type")


def completion_id(task_uuid: str | None, text: bool = False) -> str:
    return "%s-%s" % ("cmpl" if text else "chatcmpl", task_uuid or uuidlib.uuid4())


def chat_completion(model: str, task_uuid: str | None, content: str | None = None,
                    created: int | None = None) -> dict[str, Any]:
    """The spec's answer: content is the task uuid, unless the gateway waited for the pictures."""
    message: dict[str, Any] = {"role": "assistant", "content": task_uuid if content is None else content}
    if task_uuid is not None:
        message["task_uuid"] = task_uuid
    return {
        "id": completion_id(task_uuid),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def tool_call_completion(model: str, call: frontends.ToolCall) -> dict[str, Any]:
    """An assistant message calling a tool (the front-end then runs it), finish_reason tool_calls."""
    body = chat_completion(model, None, "")
    body["id"] = completion_id(None)
    body["choices"][0] = {"index": 0, "message": {"role": "assistant", "content": None,
                                                  "tool_calls": [call.as_dict()]}, "finish_reason": "tool_calls"}
    return body


def text_completion(model: str, task_uuid: str | None, content: str, created: int | None = None) -> dict[str, Any]:
    """A legacy completion: `choices[0].text` is the task uuid, or the pictures in wait mode."""
    body: dict[str, Any] = {
        "id": completion_id(task_uuid, text=True),
        "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "text": content, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
    if task_uuid is not None:
        body["task_uuid"] = task_uuid
    return body


def text_chunk(completion: str, model: str, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": completion, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(completion: str, model: str, text: bool) -> dict[str, Any]:
    """The last chunk of a stream asked for with stream_options.include_usage."""
    return {"id": completion, "object": "text_completion" if text else "chat.completion.chunk",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def chat_chunk(completion: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               created: int | None = None) -> dict[str, Any]:
    return {
        "id": completion,
        "object": "chat.completion.chunk",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def markdown_images(urls: tuple[str, ...] | list[str]) -> str:
    """One markdown image per URL: what chat front-ends render as pictures."""
    return "\n\n".join("![image %d](%s)" % (i, url) for i, url in enumerate(urls, 1))


def progress_line(task: Task) -> str:
    if task.queue_position is not None and task.status == "pending":
        return "Waiting in the queue (position %d)…\n" % task.queue_position
    if task.progress is not None:
        return "Generating: %s, %d%%\n" % (task.status, task.progress)
    return "Generating: %s\n" % task.status


def restart_note(task_uuid: str, status: str) -> str:
    return ("\nThe gateway is restarting. Task %s is %s and goes on: fetch its pictures with "
            "GET /v1/images/%s.\n" % (task_uuid, status, task_uuid))


def images_response(urls: list[str] | tuple[str, ...], b64: list[str] | None = None,
                    created: int | None = None, request: ImagesRequest | None = None) -> dict[str, Any]:
    data = [{"b64_json": item} for item in b64] if b64 is not None else [{"url": url} for url in urls]
    body: dict[str, Any] = {"created": int(time.time()) if created is None else created, "data": data}
    if request is not None and request.gpt_image:
        g = request.generation
        body.update(size="%dx%d" % (g.width, g.height), quality=request.quality, output_format=request.output_format,
                    background="opaque" if request.background == "auto" else request.background,
                    usage=image_usage(request))
    return body


def model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "zimage"}


def model_list(model_ids: list[str]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m) for m in model_ids]}


def images_ready(task: Task, urls: tuple[str, ...] | None = None,
                 source_urls: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A finished task: `urls` the pictures as answers give them (default: the task's own), and
    the provider's links as source_urls when those are not the answer (pictures=keep)."""
    body = {"uuid": task.uuid, "status": task.status, "image_urls": list(task.image_urls if urls is None else urls),
            "task_info": task.raw}
    if source_urls is not None:
        body["source_urls"] = list(source_urls)
    return body


def task_progress(task: Task) -> dict[str, Any]:
    """A still-running task, for `?wait=false` and interrupted waits."""
    body: dict[str, Any] = {"uuid": task.uuid, "status": task.status, "progress": task.progress,
                            "task_info": task.raw}
    if task.queue_position is not None:
        body["queue_position"] = task.queue_position
    return body


def task_object(record: Any, links: LinkMaker | None = None) -> dict[str, Any]:
    """A recorded task (store.TaskRecord) as GET /v1/tasks lists it; `links` gives the gateway's
    own picture links (pictures=keep), the provider's then being source_urls."""
    body = {"id": record.uuid, "object": "task", "status": record.status, "model": record.model,
            "created_at": int(record.submitted_at),
            "finished_at": None if record.finished_at is None else int(record.finished_at),
            "prompt": record.prompt, "size": "%dx%d" % (record.width, record.height), "n": record.batch_size,
            "image_urls": list(record.image_urls), "error": record.error}
    if links is not None and record.image_urls:
        body.update(image_urls=list(links(record.uuid, len(record.image_urls), record.batch_size)),
                    source_urls=list(record.image_urls))
    return body


def task_list(records: list[Any], has_more: bool,
              links: LinkMaker | None = None) -> dict[str, Any]:
    """OpenAI's list shape."""
    data = [task_object(record, links) for record in records]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def task_pending(task: Task | None, uuid: str) -> dict[str, Any]:
    """A task still running when a `Prefer: wait` ran out (202)."""
    return {"id": uuid, "object": "task", "status": task.status if task else "pending",
            "progress": task.progress if task else None}
