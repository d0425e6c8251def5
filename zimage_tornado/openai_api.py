"""Translation between OpenAI-shaped requests/responses and the gateway's value objects.

Only this module knows OpenAI's shapes; it is pure (no I/O) so it is tested without a server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

from zimage_tornado import validation
from zimage_tornado.domain import FAILED, GenerationRequest, Task
from zimage_tornado.errors import ApiError, invalid
from zimage_tornado.validation import Limits


class ModelTable:
    """OpenAI model name -> upstream model name: explicit aliases first, then the spec's rule
    ("turbo" when the name contains "turbo", in any case, else "base")."""

    def __init__(self, aliases: Mapping[str, str] | None = None) -> None:
        self._aliases = {name.lower(): target for name, target in (aliases or {}).items()}

    def upstream(self, name: str) -> str:
        alias = self._aliases.get(name.lower())
        if alias is not None:
            return alias
        return "turbo" if "turbo" in name.lower() else "base"


@dataclass(frozen=True)
class ChatRequest:
    generation: GenerationRequest
    model: str  # as the client named it, echoed back


def parse_chat_request(body: Any, limits: Limits, models: ModelTable) -> ChatRequest:
    body = validation.json_object(body)
    nested = body.get("extra_body")
    nested = {} if nested is None else validation.json_object(nested, "extra_body")
    model = body.get("model")
    if model is None:
        model = "zimage-base"
    model = validation.string(model, "model", max_length=200, allow_empty=False)
    messages = body.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise invalid("messages must be an array of message objects", param="messages", code="invalid_type")

    # The curl examples nest parameters in "extra_body"; the OpenAI SDK merges extra_body=
    # into the top level of the JSON. Read both, nested first.
    merged = {**body, **{k: v for k, v in nested.items() if v is not None}}
    if merged.get("prompt") is not None:
        prompt = validation.prompt(merged["prompt"], limits)
    else:
        prompt = validation.prompt(last_user_text(messages or []), limits, param="messages")
    fields = validation.generation_fields(merged, limits)
    generation = GenerationRequest(prompt=prompt, model=models.upstream(model), **fields)
    return ChatRequest(generation=generation, model=model)


def last_user_text(messages: list[Any]) -> str:
    """The text of the last user message (chat clients send the whole history)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message.get("content"))
    raise invalid("No prompt: give extra_body.prompt, prompt, or a user message", param="messages",
                  code="missing_value")


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if all(isinstance(text, str) for text in texts):
            return "\n".join(texts)
    raise invalid("message content must be a string or an array of text parts", param="messages",
                  code="invalid_type")


def chat_completion(model: str, task_uuid: str, created: int | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-%s" % task_uuid,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": task_uuid, "task_uuid": task_uuid},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def images_ready(task: Task) -> dict[str, Any]:
    return {"uuid": task.uuid, "status": task.status, "image_urls": list(task.image_urls), "task_info": task.raw}


def task_progress(task: Task) -> dict[str, Any]:
    """A still-running task, for `?wait=false` and interrupted waits."""
    body: dict[str, Any] = {"uuid": task.uuid, "status": task.status, "progress": task.progress,
                            "task_info": task.raw}
    if task.queue_position is not None:
        body["queue_position"] = task.queue_position
    return body


def task_failed(task: Task) -> ApiError:
    reason = task.error or "the upstream reported the task as failed"
    return ApiError(502, "Task %s failed: %s" % (task.uuid, reason), type="upstream_error", code="task_failed",
                    extra={"uuid": task.uuid, "status": FAILED, "reason": reason, "task_info": task.raw})


def wait_timed_out(uuid: str, seconds: float, task: Task | None, upstream_error: Exception | None) -> ApiError:
    """The budget ran out. If the upstream's last answer was a failure, name it (502/504)."""
    extra: dict[str, Any] = {
        "uuid": uuid,
        "status": "timeout",
        "last_status": task.status if task else None,
        "progress": task.progress if task else None,
    }
    if upstream_error is not None:
        extra["upstream_error"] = str(upstream_error)
        status = 504 if getattr(upstream_error, "status", 502) == 504 else 502
        return ApiError(status, "Task %s: still waiting after %gs and the upstream is failing: %s"
                        % (uuid, seconds, upstream_error), type="upstream_error",
                        code="upstream_unavailable", extra=extra)
    return ApiError(504, "Task %s is still %s after %gs; ask again later"
                    % (uuid, extra["last_status"] or "running", seconds), type="timeout_error",
                    code="timeout", extra=extra)
