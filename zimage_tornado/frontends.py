"""What chat front-ends send to a chat model besides picture requests, and what answers them
without a job: the one list of housekeeping templates, image tools offered for function calling,
and the legacy "the image was made" context.

Open WebUI (0.12, its default templates) asks the chat model itself for a title, tags,
follow-ups, search queries, an image prompt, an autocompletion and an emoji after each message;
with native function calling its image button offers a `generate_image` tool, and in legacy mode
it makes the picture through the images endpoint and then sends the chat again with a system
message saying so. Each of these would otherwise be a paid image job of the template's text.
"""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any, Callable

# Tool names that mean "make a picture" (the `image_tools` setting adds more).
IMAGE_TOOLS = ("generate_image", "image_generation", "create_image")
IMAGE_TOOLS_SET = frozenset(IMAGE_TOOLS)
# A tool's own name for the prompt, in order of preference, when its schema lists several strings.
PROMPT_PARAMETERS = ("prompt", "description", "text", "query", "input")
LEGACY_CONTEXT_RE = re.compile(r"<context>\s*(The requested image has been|Image generation was attempted)", re.I)
HISTORY_RE = re.compile(r"<chat_history>\s*(.*?)\s*</chat_history>", re.S)
ROLE_LINE_RE = re.compile(r"^(USER|ASSISTANT|SYSTEM):[ \t]?", re.M)
MADE = "Here is the picture you asked for."
NOT_MADE = "The picture could not be made."


def last_user_line(history: str) -> str:
    """Open WebUI writes the history as "ROLE: content" blocks; the last USER block's text."""
    parts = ROLE_LINE_RE.split(history)  # ["", role, text, role, text, ...]
    users = [text.strip() for role, text in zip(parts[1::2], parts[2::2]) if role == "USER"]
    return users[-1] if users else ""


def history_request(prompt: str) -> str:
    """The user's last words in a template's <chat_history>, or "" when it has none."""
    history = HISTORY_RE.search(prompt)
    return last_user_line(history.group(1)) if history else ""


def title_of(prompt: str) -> str:
    words = history_request(prompt).split("\n", 1)[0].strip()
    title = words if len(words) <= 60 else words[:60].rsplit(" ", 1)[0]
    return title or "Image generation"


@dataclass(frozen=True)
class Template:
    """One housekeeping prompt: how it opens (after white space, any case) and what answers it."""

    name: str
    opening: str
    reply: Callable[[str], Any]  # the prompt -> a JSON value (or a plain string) to answer
    in_system: bool = False  # it comes as a system message (the others, as the only user message)


# Open WebUI's default task templates (open_webui/config.py, 0.6 to 0.12.4), by their first words.
# Every reply is what its parser reads: JSON between the first "{" and the last "}", or an emoji.
TEMPLATES = (
    Template("title", "### Task:\nGenerate a concise", lambda p: {"title": title_of(p)}),  # "3-5 word title", "title"
    Template("tags", "### Task:\nGenerate 1-3 broad tags", lambda p: {"tags": ["Image"]}),
    Template("follow_ups", "### Task:\nSuggest 3-5 relevant follow-up", lambda p: {"follow_ups": []}),
    Template("follow_ups", "### Task:\nPredict 3-5 useful messages", lambda p: {"follow_ups": []}),  # 0.12
    Template("queries", "### Task:\nAnalyze the chat history to determine the necessity of generating search",
             lambda p: {"queries": []}),
    Template("image_prompt", "### Task:\nGenerate a detailed prompt for a",
             lambda p: {"prompt": history_request(p) or p, "title": title_of(p)}),
    Template("autocomplete", "### Task:\nYou are an autocompletion system", lambda p: {"text": ""}),
    Template("emoji", "Your task is to reflect the speaker's likely facial expression", lambda p: "🎨"),
    Template("tools", "Available Tools:", lambda p: {"tool_calls": []}, in_system=True),
    Template("moa", "You have been provided with a set of responses from various models", lambda p: ""),
    # any other template of theirs: a title, tags and follow-ups at once, whichever it reads
    Template("task", "### Task:", lambda p: {"title": title_of(p), "tags": ["Image"], "follow_ups": [],
                                             "prompt": history_request(p) or p}),
)


# Open WebUI's retrieval template (a file, a knowledge base or web search attached): it comes
# before the user's own words, in the last user message (or, with RAG_SYSTEM_CONTEXT, a system
# message). It is a picture request with context, never housekeeping: the words after it are the
# prompt.
RAG_OPENING = "### Task:\nRespond to the user query using the provided context"


def user_request(text: str) -> str:
    """The user's own words of a last user message: without a retrieval template before them."""
    if not text.lstrip().lower().startswith(RAG_OPENING.lower()):
        return text
    _, closing, after = text.rpartition("</context>")
    return after.strip() if closing else text


def housekeeping(prompt: str, systems: list[str]) -> Template | None:
    """The template the last user message (`prompt`) opens with, or a system message for the
    templates that come as one; None for a picture request."""
    candidates = [(prompt, False)] + [(text, True) for text in systems]
    for text, is_system in candidates:
        opened = text.lstrip().lower()
        if opened.startswith(RAG_OPENING.lower()):
            continue
        for template in TEMPLATES:
            if template.in_system == is_system and opened.startswith(template.opening.lower()):
                return template
    return None


def housekeeping_reply(template: Template, prompt: str) -> str:
    value = template.reply(prompt)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCall:
    """The call of an image tool that answers a chat request: the front-end makes the picture."""

    id: str
    name: str
    arguments: str  # JSON, as OpenAI sends it

    def as_dict(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def image_tool(tools: Any, names: frozenset[str]) -> tuple[str, dict[str, Any]] | None:
    """The first function tool offered whose name makes pictures: (name, its parameters schema)."""
    if not isinstance(tools, list):
        return None
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" \
            else None
        if isinstance(function, dict) and function.get("name") in names:
            schema = function.get("parameters")
            return function["name"], schema if isinstance(schema, dict) else {}
    return None


def call_arguments(schema: dict[str, Any], prompt: str, size: tuple[int, int] | None) -> str:
    """The prompt under the tool's own name for it (a string property of its schema), and the
    size where the tool takes one."""
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    strings = [name for name, spec in properties.items() if isinstance(spec, dict) and spec.get("type") == "string"]
    required = schema.get("required")
    required = required if isinstance(required, list) else []
    name = next((n for n in PROMPT_PARAMETERS if n in strings), None) or next(
        (n for n in required if n in strings), None) or (strings[0] if strings else "prompt")
    arguments: dict[str, Any] = {name: prompt}
    if size is not None and "size" in strings:
        arguments["size"] = "%dx%d" % size
    return json.dumps(arguments, ensure_ascii=False)


def new_call(name: str, arguments: str) -> ToolCall:
    return ToolCall("call_" + uuidlib.uuid4().hex[:24], name, arguments)


def answered_tool(messages: list[Any], names: frozenset[str]) -> bool:
    """Whether the conversation ends with the result of an image tool call (the picture is made)."""
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "tool":
        return False
    calls: dict[str, str] = {}
    for message in messages:
        for call in (message.get("tool_calls") or []) if isinstance(message, dict) else []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(call.get("id"), str):
                calls[call["id"]] = function.get("name", "")
    called = calls.get(messages[-1].get("tool_call_id") or "")
    return called is None or called in names  # a result with no call on record: still not a new picture


def legacy_context(messages: list[Any]) -> bool:
    """Open WebUI's legacy image flow: the picture was made (or failed) by the images endpoint and
    a system message says so; the chat that follows asks for words, not a second picture."""
    return any(isinstance(m, dict) and m.get("role") == "system" and isinstance(m.get("content"), str)
               and LEGACY_CONTEXT_RE.search(m["content"]) for m in messages)
